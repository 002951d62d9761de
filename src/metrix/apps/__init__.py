"""Applications of learned metrics: verification/identification, OOD detection, few-shot."""
