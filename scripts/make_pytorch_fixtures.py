#!/usr/bin/env python3
"""Write tiny PyTorch (`torch.save`) checkpoints from the safetensors fixture
fixtures/opt/tiny-opt, and small hostile files, for the tests of
crates/checkpoint and crates/engine-opt.

    python3 scripts/make_pytorch_fixtures.py --out fixtures/pytorch
    python3 scripts/make_pytorch_fixtures.py --out /tmp/real --real-torch

Without torch (the default, and what the committed files were made with) it
emulates torch.save exactly: Python's pickle at protocol 2, a Pickler whose
persistent_id turns a storage into ('storage', <storage class>, key, 'cpu',
numel), tensors that reduce to torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, OrderedDict()), stand-in modules `torch`
and `torch._utils` registered in sys.modules so that pickle writes the same
GLOBAL opcodes torch does, and a zip of stored entries archive/data.pkl,
archive/byteorder, archive/data/<key> (aligned to 64 bytes, as torch aligns
them) and archive/version. With --real-torch it calls torch.save instead, to
confirm the reader reads real torch output.

Only the standard library is needed; the safetensors file is read by hand
(an 8-byte little-endian header length, a JSON header, raw bytes).

What it writes (see fixtures/pytorch/README.md):
  tiny-opt-bin/          pytorch_model.bin: every tensor as f16 (HalfStorage;
                         tiny-opt's values are exact in f16), plus
                         lm_head.weight sharing embed_tokens' storage (tied,
                         as torch.save(model.state_dict()) writes it); the
                         state dict is an OrderedDict with torch's _metadata
                         attribute (a BUILD opcode).
  tiny-opt-bin-sharded/  2 shards + pytorch_model.bin.index.json, f32
                         (FloatStorage, byte-identical to tiny-opt); each
                         layer's q/k/v weights are views at offsets 0, n, 2n
                         of one fused storage; plain dicts, as Hugging Face's
                         sharding writes them.
  hostile/               global-os-system.bin (a pickle that would call
                         os.system: must be refused), truncated.bin (a zip
                         cut short), short-storage.bin (a storage entry
                         shorter than its tensor), legacy.bin (the pre-1.6
                         non-zip format).
"""

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SOURCE = os.path.join(ROOT, "fixtures", "opt", "tiny-opt")
COPIED = ["config.json", "tokenizer.json"]
ALIGN = 64
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def read_safetensors(path):
    """name -> (dtype, shape, bytes), in file order."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = collections.OrderedDict()
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), raw[base + start : base + end])
    return out


def f32_to_f16(data):
    """f32 bytes to f16 bytes; refuses values f16 does not hold exactly."""
    count = len(data) // 4
    vals = struct.unpack("<%df" % count, data)
    half = struct.pack("<%de" % count, *vals)
    if struct.unpack("<%de" % count, half) != vals:
        sys.exit("a value of the source is not exact in f16")
    return half


# --- torch.save, emulated ---------------------------------------------------


class Storage:
    """A storage: its class name (FloatStorage, ...), bytes and element count."""

    def __init__(self, cls_name, data, itemsize):
        self.cls_name = cls_name
        self.data = data
        self.numel = len(data) // itemsize


class Tensor:
    """A tensor on a storage, reduced the way torch.Tensor reduces."""

    def __init__(self, storage, offset, size):
        self.storage, self.offset, self.size = storage, offset, tuple(size)
        stride, acc = [], 1
        for d in reversed(self.size):
            stride.append(acc)
            acc *= d
        self.stride = tuple(reversed(stride))

    def __reduce_ex__(self, protocol):
        utils = sys.modules["torch._utils"]
        return (
            utils._rebuild_tensor_v2,
            (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()),
        )


def install_stand_in_torch():
    """Modules `torch` and `torch._utils` with the globals torch.save names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise RuntimeError("a stand-in: never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ["FloatStorage", "HalfStorage"]:
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch


class TorchPickler(pickle.Pickler):
    def __init__(self, f, torch, protocol):
        super().__init__(f, protocol=protocol)
        self.torch = torch
        self.keys = {}
        self.storages = []

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if id(obj) not in self.keys:
                self.keys[id(obj)] = str(len(self.keys))
                self.storages.append(obj)
            return ("storage", getattr(self.torch, obj.cls_name), self.keys[id(obj)], "cpu", obj.numel)
        return None


def write_archive(path, entries):
    """A zip of stored entries with each entry's data aligned to ALIGN bytes
    (torch pads the local extra field with an 'FB' record to do this)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            start = buf.tell() + 30 + len(name.encode()) + 4
            pad = (ALIGN - start % ALIGN) % ALIGN
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def fake_save(state_dict, path, torch, protocol=2):
    pkl = io.BytesIO()
    pickler = TorchPickler(pkl, torch, protocol)
    pickler.dump(state_dict)
    entries = [("archive/data.pkl", pkl.getvalue()), ("archive/byteorder", b"little")]
    for key, storage in enumerate(pickler.storages):
        entries.append(("archive/data/%d" % key, storage.data))
    entries.append(("archive/version", b"3\n"))
    write_archive(path, entries)


# --- the checkpoints ----------------------------------------------------------


def single_state_dict(src, make):
    """f16 tensors, lm_head.weight tied to embed_tokens, torch's _metadata."""
    sd = collections.OrderedDict()
    for name, (dtype, shape, data) in src.items():
        assert dtype == "F32", (name, dtype)
        sd[name] = make.tensor(make.storage("HalfStorage", f32_to_f16(data), 2), 0, shape)
    embed = sd["model.decoder.embed_tokens.weight"]
    sd["lm_head.weight"] = make.view(embed, 0, make.shape_of(embed))
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return sd


def sharded_state_dicts(src, make):
    """f32 tensors in two shards (layer 0 and everything before it; the rest),
    q/k/v of each layer as views of one fused storage."""
    shards = [{}, {}]
    names = list(src)
    fused = {}
    for name in names:
        dtype, shape, data = src[name]
        last = ".layers.1." in name or ("final_layer_norm" in name and ".layers." not in name)
        shard = 1 if last else 0
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            prefix = name.rsplit(".", 2)[0]
            if prefix not in fused:
                parts = [src["%s.%s_proj.weight" % (prefix, p)] for p in "qkv"]
                storage = make.storage("FloatStorage", b"".join(p[2] for p in parts), 4)
                fused[prefix] = storage
            which = "qkv".index(name.rsplit(".", 2)[1][0])
            numel = len(data) // 4
            shards[shard][name] = make.tensor(fused[prefix], which * numel, shape)
        else:
            shards[shard][name] = make.tensor(make.storage("FloatStorage", data, 4), 0, shape)
    return shards


class FakeMaker:
    def storage(self, cls_name, data, itemsize):
        return Storage(cls_name, data, itemsize)

    def tensor(self, storage, offset, shape):
        return Tensor(storage, offset, shape)

    def view(self, t, offset, shape):
        return Tensor(t.storage, offset, shape)

    def shape_of(self, t):
        return t.size


class RealMaker:
    def __init__(self, torch):
        self.torch = torch

    def storage(self, cls_name, data, itemsize):
        dtype = {"FloatStorage": self.torch.float32, "HalfStorage": self.torch.float16}[cls_name]
        return self.torch.frombuffer(bytearray(data), dtype=dtype)

    def tensor(self, storage, offset, shape):
        n = 1
        for d in shape:
            n *= d
        return storage[offset : offset + n].view(shape)

    def view(self, t, offset, shape):
        return t

    def shape_of(self, t):
        return tuple(t.shape)


def write_index(directory, shards, files, total):
    weight_map = {}
    for shard, file in zip(shards, files):
        for name in shard:
            weight_map[name] = file
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


def hostile(directory, torch_fake):
    os.makedirs(directory, exist_ok=True)
    # A pickle that, loaded by Python's pickle, would run a shell command.
    evil = b"\x80\x02cos\nsystem\nq\x00X\x2a\x00\x00\x00echo this checkpoint ran code when loaded!q\x01\x85q\x02Rq\x03."
    assert len("echo this checkpoint ran code when loaded!") == 0x2A
    write_archive(
        os.path.join(directory, "global-os-system.bin"),
        [("archive/data.pkl", evil), ("archive/byteorder", b"little"), ("archive/version", b"3\n")],
    )
    make = FakeMaker()
    one = collections.OrderedDict([("w", make.tensor(make.storage("HalfStorage", bytes(range(16)), 2), 0, (2, 4)))])
    path = os.path.join(directory, "short-storage.bin")
    fake_save(one, path, torch_fake)
    # Keep the pickle (8 elements claimed), store only 6 bytes of data.
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    entries = [(n, d[:6] if n == "archive/data/0" else d) for n, d in entries]
    write_archive(path, entries)
    # A valid archive cut before its central directory.
    fake_save(one, os.path.join(directory, "whole.tmp"), torch_fake)
    with open(os.path.join(directory, "whole.tmp"), "rb") as f:
        whole = f.read()
    os.remove(os.path.join(directory, "whole.tmp"))
    with open(os.path.join(directory, "truncated.bin"), "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])
    # The legacy format: pickled magic number, protocol version, sys info.
    with open(os.path.join(directory, "legacy.bin"), "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "pytorch"))
    ap.add_argument("--real-torch", action="store_true", help="write with torch.save (needs torch)")
    ap.add_argument(
        "--protocol",
        type=int,
        default=2,
        choices=[2, 3, 4, 5],
        help="pickle protocol of the checkpoints (torch.save's default, and the committed files', is 2)",
    )
    args = ap.parse_args()

    src = read_safetensors(os.path.join(SOURCE, "model.safetensors"))
    if args.real_torch:
        import torch

        make = RealMaker(torch)

        def save(sd, path):
            torch.save(sd, path, pickle_protocol=args.protocol)

    else:
        torch_fake = install_stand_in_torch()
        make = FakeMaker()

        def save(sd, path):
            fake_save(sd, path, torch_fake, args.protocol)

    single = os.path.join(args.out, "tiny-opt-bin")
    sharded = os.path.join(args.out, "tiny-opt-bin-sharded")
    for d in [single, sharded]:
        os.makedirs(d, exist_ok=True)
        for name in COPIED:
            shutil.copyfile(os.path.join(SOURCE, name), os.path.join(d, name))

    sd = single_state_dict(src, make)
    save(sd, os.path.join(single, "pytorch_model.bin"))

    shards = sharded_state_dicts(src, make)
    files = ["pytorch_model-%05d-of-%05d.bin" % (i + 1, len(shards)) for i in range(len(shards))]
    for shard, file in zip(shards, files):
        save(shard, os.path.join(sharded, file))
    write_index(sharded, shards, files, sum(len(data) for _, _, data in src.values()))

    if not args.real_torch:
        hostile(os.path.join(args.out, "hostile"), torch_fake)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
