import json

import pytest
import torch

from metrix.io import CorruptFileError, flatten_state, load_json, load_tensors, save_json, save_tensors, unflatten_state


def test_tensor_roundtrip_and_checksum(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}
    save_tensors(tmp_path / "t.safetensors", t, {"note": "x"})
    back, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {"note": "x"} and all(torch.equal(back[k], t[k]) for k in t)
    raw = bytearray((tmp_path / "t.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "t.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_tensors(tmp_path / "t.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(CorruptFileError):
        load_tensors(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")


def test_unknown_version_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "v.safetensors"), metadata={"metrix_format": "99"})
    with pytest.raises(CorruptFileError, match="version '99'"):
        load_tensors(tmp_path / "v.safetensors")


def test_json_roundtrip_and_tamper(tmp_path):
    save_json(tmp_path / "c.json", {"x": 1, "y": [1, 2]})
    assert load_json(tmp_path / "c.json") == {"x": 1, "y": [1, 2]}
    data = json.loads((tmp_path / "c.json").read_text())
    data["x"] = 2
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_json(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_json(tmp_path / "c.json")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    save_json(tmp_path / "a.json", {"k": 1})
    save_json(tmp_path / "a.json", {"k": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_flatten_optimizer_state_roundtrip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    tensors, tree = flatten_state(opt.state_dict())
    json.dumps(tree)  # the tree is plain JSON
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot serialise"):
        flatten_state({"f": object()})


def test_saved_files_get_the_users_umask(tmp_path):
    """mkstemp makes 0600 files; what metrix saves is readable as any file the user creates (umask 022 here)."""
    import os
    import stat

    from metrix.io import _UMASK, save_tensors

    path = save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(3)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_UMASK
