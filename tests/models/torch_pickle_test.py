"""Reading torch.save checkpoints without torch (clax.models.torch_pickle).

The checkpoints are written here without torch: a Pickler whose ``persistent_id`` emits
torch's storage ids and whose tensors reduce to ``torch._utils._rebuild_tensor_v2``, resolved
through stand-in ``torch``/``torch._utils`` modules placed in ``sys.modules`` only while
pickling. When torch is importable the reader is also compared with ``torch.load``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from clax.models.torch_pickle import (
    UnsafeCheckpointError,
    load_torch_state_dict,
    read_torch_checkpoint,
)

# --------------------------------------------------------------------------------------
# A torch-free writer of both formats


class FakeStorage:
    """A flat storage; ``kind`` is the torch storage class name (e.g. "FloatStorage")."""

    def __init__(self, key: str, data: np.ndarray, kind: str):
        self.key, self.data, self.kind = key, np.ascontiguousarray(data).ravel(), kind


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


_CALLS: list[str] = []


def _evil(*args):  # a global a malicious pickle might name; must never run
    _CALLS.append("called")


def _fake_torch_modules():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # only its module and name end up in the pickle
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for kind in ("FloatStorage", "LongStorage", "HalfStorage", "BFloat16Storage",
                 "BoolStorage", "DoubleStorage"):
        cls = type(kind, (), {"__module__": "torch", "__qualname__": kind})
        setattr(torch, kind, cls)
    return torch, utils


class _TorchLikePickler(pickle.Pickler):
    def __init__(self, file, torch_module, *, legacy: bool):
        super().__init__(file, protocol=2)
        self.torch, self.legacy = torch_module, legacy
        self.storages: dict[str, FakeStorage] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, FakeStorage):
            return None
        self.storages[obj.key] = obj
        storage_type = getattr(self.torch, obj.kind)
        if self.legacy:  # (..., root_key, location, numel, view_metadata)
            return ("storage", storage_type, obj.key, "cpu", obj.data.size, None)
        return ("storage", storage_type, obj.key, "cpu", obj.data.size)

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            return (self.torch._utils._rebuild_tensor_v2,
                    (obj.storage, obj.offset, obj.size, obj.stride, False,
                     collections.OrderedDict()))
        return NotImplemented


def _pickle(obj, monkeypatch, *, legacy=False) -> tuple[bytes, dict[str, FakeStorage]]:
    torch, utils = _fake_torch_modules()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", torch)
        m.setitem(sys.modules, "torch._utils", utils)
        buf = io.BytesIO()
        pickler = _TorchLikePickler(buf, torch, legacy=legacy)
        pickler.dump(obj)
    return buf.getvalue(), pickler.storages


def write_zip(path, obj, monkeypatch, *, byteorder="little", folder="archive"):
    data_pkl, storages = _pickle(obj, monkeypatch)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{folder}/data.pkl", data_pkl)
        z.writestr(f"{folder}/byteorder", byteorder)
        z.writestr(f"{folder}/version", "3\n")
        for key, s in storages.items():
            arr = s.data.astype(s.data.dtype.newbyteorder("<" if byteorder == "little" else ">"))
            z.writestr(f"{folder}/data/{key}", arr.tobytes())
    return path


def write_legacy(path, obj, monkeypatch):
    main, storages = _pickle(obj, monkeypatch, legacy=True)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001,
                       {"protocol_version": 1001, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(main)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:  # int64 element count, then the raw little-endian elements
            data = storages[key].data
            f.write(struct.pack("<q", data.size))
            f.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
    return path


# A 12-element storage shared by three tensors: contiguous, transposed, offset window.
BASE = np.arange(12, dtype=np.float32) * 0.5 - 2.0


def _sample_state():
    shared = FakeStorage("0", BASE, "FloatStorage")
    return collections.OrderedDict(
        [
            ("w", FakeTensor(shared, 0, (3, 4), (4, 1))),
            # Column-major (3, 4) view = a transpose, like weights converted from TF.
            ("wt", FakeTensor(shared, 0, (4, 3), (1, 4))),
            # Offset 5, row stride 3: elements [[5, 6], [8, 9]].
            ("win", FakeTensor(shared, 5, (2, 2), (3, 1))),
            ("steps", FakeTensor(FakeStorage("1", np.array([7], np.int64), "LongStorage"),
                                 0, (), ())),
            ("half", FakeTensor(FakeStorage("2", np.array([1.5, -2.0], np.float16),
                                            "HalfStorage"), 0, (2,), (1,))),
            ("bf16", FakeTensor(FakeStorage("3", np.array([3.0, 0.25], ml_dtypes.bfloat16),
                                            "BFloat16Storage"), 1, (1,), (1,))),
            ("mask", FakeTensor(FakeStorage("4", np.array([True, False, True]), "BoolStorage"),
                                0, (3,), (1,))),
        ]
    )


def _check_sample(sd):
    assert list(sd) == ["w", "wt", "win", "steps", "half", "bf16", "mask"]
    np.testing.assert_array_equal(sd["w"], BASE.reshape(3, 4))
    np.testing.assert_array_equal(sd["wt"], BASE.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["win"], BASE[[[5, 6], [8, 9]]])
    assert sd["steps"].shape == () and sd["steps"].dtype == np.int64 and sd["steps"] == 7
    assert sd["half"].dtype == np.float16 and sd["half"].tolist() == [1.5, -2.0]
    assert sd["bf16"].dtype == ml_dtypes.bfloat16 and sd["bf16"].astype(float).tolist() == [0.25]
    assert sd["mask"].dtype == np.bool_ and sd["mask"].tolist() == [True, False, True]
    for v in sd.values():  # independent, contiguous copies
        assert v.flags["C_CONTIGUOUS"] and v.flags["OWNDATA"]


def test_zip_format_honours_strides_offsets_and_dtypes(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "ckpt.pt", _sample_state(), monkeypatch)
    _check_sample(load_torch_state_dict(path))


def test_zip_format_other_folder_name_and_big_endian(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "be.pt", _sample_state(), monkeypatch, byteorder="big",
                     folder="my_model")
    sd = load_torch_state_dict(path)
    _check_sample(sd)
    assert sd["w"].dtype.isnative


def test_legacy_format(tmp_path, monkeypatch):
    path = write_legacy(tmp_path / "legacy.pth", _sample_state(), monkeypatch)
    _check_sample(load_torch_state_dict(path))


def test_wrapped_state_dict_is_unwrapped(tmp_path, monkeypatch):
    obj = {"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": _sample_state()}
    path = write_zip(tmp_path / "wrapped.pt", obj, monkeypatch)
    _check_sample(load_torch_state_dict(path))
    raw = read_torch_checkpoint(path)  # the whole object, tensors as arrays
    assert raw["epoch"] == 3 and raw["optimizer"] == {"lr": 0.1}
    assert isinstance(raw["state_dict"]["w"], np.ndarray)


def test_refused_global_is_not_called(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (_evil, ("rm -rf /",))

    state = _sample_state()
    state["payload"] = Evil()
    path = write_zip(tmp_path / "evil.pt", state, monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*torch_pickle_test\._evil"):
        load_torch_state_dict(path)
    assert _CALLS == []
    # Plain pickles of arbitrary objects are refused the same way.
    legacy = tmp_path / "print.pth"
    legacy.write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"print\.pth.*builtin__\.print"):
        load_torch_state_dict(legacy)


def test_bad_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch_state_dict(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(pickle.UnpicklingError, match="junk.pt"):
        load_torch_state_dict(junk)
    # A storage file shorter than its element count says.
    path = write_zip(tmp_path / "short.pt", _sample_state(), monkeypatch)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["archive/data/0"] = members["archive/data/0"][:-4]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(pickle.UnpicklingError, match=r"short\.pt.*archive/data/0"):
        load_torch_state_dict(path)
    # A pickle without any tensors.
    empty = write_zip(tmp_path / "empty.pt", {"epoch": 1}, monkeypatch)
    with pytest.raises(ValueError, match="no tensors"):
        load_torch_state_dict(empty)


def test_against_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        w=base,
        wt=base.t(),  # non-contiguous
        win=base[1:3, 2:5],  # offset view of a shared storage
        h=torch.tensor([1.5, -2.0], dtype=torch.float16),
        b=torch.tensor([0.25, 3.0], dtype=torch.bfloat16),
        n=torch.tensor(5),
        p=torch.nn.Parameter(torch.ones(2)),
    )
    for legacy in (False, True):
        path = tmp_path / f"torch_{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        ours = load_torch_state_dict(path)
        ref = torch.load(path, weights_only=True)
        assert list(ours) == list(ref)
        for k, v in ref.items():
            expected = v.detach().float().numpy() if v.dtype == torch.bfloat16 else \
                v.detach().numpy()
            np.testing.assert_array_equal(ours[k].astype(expected.dtype), expected, err_msg=k)
            assert ours[k].shape == tuple(v.shape)
