"""`singlepass build-engine`: the --check-only pre-flight (runs everywhere), the clear error
without TensorRT, and the engine build: Polygraphy's real loaders driven over a stand-in of the
TensorRT Python API (a real build runs only where `tensorrt` and a GPU exist; not here)."""

import enum
import json
import shutil
import sys
import types

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from cli_args import export_argv
from export_helpers import make_probe
from onnx import TensorProto, helper

from singlepass.cli import main
from singlepass.export import tensorrt as trt_mod


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_backbone, tiny_model_dir, cache_dir):
    root = tmp_path_factory.mktemp("trt")
    tox = make_probe(root / "tox", tiny_backbone, "gate")
    emo = make_probe(root / "emo", tiny_backbone, "mha", 3, factor=8, heads=2)
    out = root / "art"
    assert main(export_argv(tiny_model_dir, cache_dir, out, tox, emo)) == 0
    return out


def test_check_only_preflight_passes(artifact, capsys, tiny_backbone):
    assert (
        main(
            [
                "build-engine",
                str(artifact),
                "--check-only",
                "--precision",
                "fp16",
                "--max-batch",
                "4",
                "--max-seq",
                "128",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "pre-flight passed" in printed and "[  ok] operators" in printed
    r = json.loads((artifact / "tensorrt_preflight.json").read_text())
    assert r["ok"] and r["tensorrt_target"] == trt_mod.TARGET_TENSORRT
    assert set(r["operators"]["ops"]) <= trt_mod.SUPPORTED_OPS
    prefill, decode = r["profile_shapes"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    for p in (prefill, decode):
        for lo, opt, hi in p["shapes"].values():
            assert min(lo) >= 1 and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert prefill["shapes"]["past_key_values.0.key"] == [[1, 2, 1, 16], [2, 2, 1, 16], [4, 2, 1, 16]]  # dummy slot
    assert decode["shapes"]["attention_mask"][2] == [4, 128]
    assert r["dummy_past"]["ok"] and r["dummy_past"]["max_abs_diff"] <= 1e-4
    fr = r["fp16_range"]
    assert len(fr["layers"]) == tiny_backbone.num_layers and fr["max_abs_activation"] < trt_mod.FP16_MAX
    assert fr["hidden_states_max"][-1] > 0 and fr["other"]["probes"] > 0
    assert r["fp32_layers"]["norm_nodes"] == 2 * tiny_backbone.num_layers + 1  # one RMSNormalization each (opset 23)


def test_preflight_flags_fp16_overflow(artifact, tmp_path, capsys):
    """Scale the embedding table so the residual stream leaves fp16's range."""
    hot = tmp_path / "hot"
    shutil.copytree(artifact, hot)
    model = onnx.load(str(hot / "model.onnx"))
    from singlepass.export.surgery import find_residual_stream, producer

    graph = gs.import_onnx(model)
    s = find_residual_stream(graph, logits_name="logits")
    name = producer(graph.tensors()[s.embedding]).inputs[0].name
    table = next(t for t in model.graph.initializer if t.name == name)
    table.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(table) * 1e6, table.name))
    onnx.save_model(model, str(hot / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert main(["build-engine", str(hot), "--check-only"]) == 2
    out, err = capsys.readouterr()
    assert "[FAIL] fp16_range" in out and "pre-flight failed" in err
    r = json.loads((hot / "tensorrt_preflight.json").read_text())
    assert r["fp16_range"]["over_fp16"] and r["fp16_range"]["max_abs_activation"] > trt_mod.FP16_MAX
    assert r["onnx"]["ok"] and r["operators"]["ok"]


def test_static_checks_catch_unsupported_ops_and_zero_length_profiles():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(
        [
            helper.make_node("Unique", ["x"], ["y"]),
            helper.make_node("FusedMatMul", ["x", "x"], ["z"], domain="com.microsoft"),
            helper.make_node("ReduceMean", ["x", "x_axes"], ["w"]),
        ],
        "g",
        [x],
        [y],
    )
    g.input.append(helper.make_tensor_value_info("x_axes", TensorProto.INT64, [1]))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    r = trt_mod.check_ops(gs.import_onnx(model))
    assert not r["ok"]
    text = " ".join(r["detail"])
    assert "unsupported op Unique" in text and "com.microsoft::FusedMatMul" in text and "not a constant" in text
    bad = [{"name": "prefill", "shapes": {"input_ids": ((1, 0), (1, 1), (1, 2))}}]
    r = trt_mod.check_profiles(["input_ids"], bad)
    assert not r["ok"] and "zero-length" in r["detail"][0]


@pytest.mark.skipif(
    "tensorrt" in sys.modules or __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="TensorRT is installed here",
)
def test_build_engine_without_tensorrt_is_a_clear_error(artifact, capsys):
    assert main(["build-engine", str(artifact), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "--check-only" in err


class DataType(str, enum.Enum):
    FLOAT = "float32"
    HALF = "float16"


def _enum(name, **members):
    return enum.Enum(name, members)


class FakeTensorRT(types.ModuleType):
    """The parts of the TensorRT 10 Python API that Polygraphy's loaders (NetworkFromOnnxPath,
    PostprocessNetwork, CreateConfig, EngineBytesFromNetwork) and build_engine use, recording
    the calls. Enums carry the short names the assertions read (flag OBEY, pool WORKSPACE)."""

    def __init__(self, onnx_path_check):
        super().__init__("tensorrt")
        self.__version__ = "10.15.0"
        self.calls = []
        rec = self.calls
        fake = self
        self.float32 = DataType.FLOAT
        self.BuilderFlag = _enum(
            "BuilderFlag",
            FP16="FP16",
            BF16="BF16",
            TF32="TF32",
            OBEY_PRECISION_CONSTRAINTS="OBEY",
            PREFER_PRECISION_CONSTRAINTS="PREFER",
        )
        self.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE="WORKSPACE")
        self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        self.ProfilingVerbosity = _enum("ProfilingVerbosity", LAYER_NAMES_ONLY=0, NONE=1, DETAILED=2)
        self.DeviceType = _enum("DeviceType", GPU=0, DLA=1)
        self.LayerType = _enum("LayerType", SHAPE=0, MATRIX_MULTIPLY=1, ELEMENTWISE=2)

        class ILogger:
            def __init__(self):
                pass

        class Logger(ILogger):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def init_libnvinfer_plugins(logger, namespace):
            rec.append(("init_libnvinfer_plugins", namespace))

        class Layer:
            def __init__(self, name):
                self.name, self.num_outputs, self.precision, self.outputs = name, 1, None, {}
                self.type = fake.LayerType.ELEMENTWISE

            @property
            def precision_is_set(self):
                return self.precision is not None

            def set_output_type(self, i, dtype):
                self.outputs[i] = dtype

        class Input:
            def __init__(self, name, rank):
                self.name, self.shape, self.is_shape_tensor, self.dtype = name, (-1,) * rank, False, None

        class Network:
            def __init__(self):
                self.layers, self.inputs = [], []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

            def __iter__(self):
                return iter(self.layers)

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                rec.append(("parse_from_file", path))
                names, inputs = onnx_path_check(path)
                self.network.layers = [Layer(n) for n in names]
                self.network.inputs = [Input(n, r) for n, r in inputs]
                return True

            def get_error(self, i):
                raise AssertionError("no errors")

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Cache:
            def __init__(self, data=b"timing-cache"):
                self.data = data

            def combine(self, other, ignore_mismatch):
                return True

            def serialize(self):
                class Buffer(bytes):  # IHostMemory: a buffer and a context manager
                    def __enter__(self):
                        return self

                    def __exit__(self, *exc):
                        return False

                return Buffer(b"timing-cache")

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.pool = set(), [], {}
                self.DLA_core, self.default_device_type = -1, fake.DeviceType.GPU
                self.profiling_verbosity = None

            def set_flag(self, flag):
                self.flags.add(flag.value)

            def get_flag(self, flag):
                return flag.value in self.flags

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool.value] = size

            def get_memory_pool_limit(self, pool):
                return self.pool.get(pool.value, 0)

            def add_optimization_profile(self, p):
                self.profiles.append(p)
                return len(self.profiles) - 1

            @property
            def num_optimization_profiles(self):
                return len(self.profiles)

            def create_timing_cache(self, data):
                rec.append(("create_timing_cache", bytes(data)))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                rec.append(("create_network", flags))
                fake.network = Network()
                return fake.network

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.append(("build", len(config.profiles)))
                return b"serialized-engine"

        self.ILogger, self.Logger, self.init_libnvinfer_plugins = ILogger, Logger, init_libnvinfer_plugins
        self.Builder, self.OnnxParser = Builder, Parser


def test_build_engine_drives_the_tensorrt_api(artifact, tmp_path, monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)

    def layers_of(path):  # TensorRT names a layer after its ONNX node; the inputs with their rank
        g = onnx.load(path, load_external_data=False).graph
        return [n.name for n in g.node], [(i.name, len(i.type.tensor_type.shape.dim)) for i in g.input]

    fake = FakeTensorRT(layers_of)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    entry = trt_mod.build_engine(art, "fp16", max_batch=4, max_seq=128, log=lambda *a: None)
    assert (art / entry["file"]).read_bytes() == b"serialized-engine"
    assert (art / "tensorrt.timing.cache").read_bytes() == b"timing-cache"
    cfg = fake.config
    assert {"FP16", "OBEY"} <= cfg.flags and cfg.pool["WORKSPACE"] == 4 << 30
    assert "TF32" in cfg.flags and cfg.profiling_verbosity.name == "LAYER_NAMES_ONLY"  # TensorRT's defaults kept
    assert [p.shapes["input_ids"] for p in cfg.profiles] == [((1, 1), (2, 32), (4, 64)), ((1, 1), (2, 1), (4, 1))]
    pinned = [layer for layer in fake.network.layers if layer.precision == "float32"]
    names = {layer.name for layer in pinned}
    assert entry["fp32_layers"] == len(pinned) > 0
    assert any(n.startswith("tox/") for n in names) and any(n.startswith("emo/") for n in names)
    assert all(layer.outputs == {0: "float32"} for layer in pinned)
    matmuls = [layer for layer in fake.network.layers if "MatMul" in layer.name or "linear" in layer.name]
    assert matmuls and all(layer.precision is None for layer in matmuls if not layer.name.startswith(("tox/", "emo/")))
    m = json.loads((art / "manifest.json").read_text())
    assert m["engines"][0]["file"] == entry["file"] and m["engines"][0]["dummy_past_slot"]
    with pytest.raises(Exception, match="exists"):
        trt_mod.build_engine(art, "fp16", max_batch=4, max_seq=128, log=lambda *a: None)
    fake.calls.clear()
    trt_mod.build_engine(art, "fp16", max_batch=4, max_seq=128, force=True, log=lambda *a: None)
    assert ("create_timing_cache", b"timing-cache") in fake.calls  # the timing cache is reused
    assert not [f.name for f in art.iterdir() if f.name.endswith((".lock", ".tmp"))]  # no lock / temporary files


def test_real_tensorrt_engine(artifact, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installable on this project's machines")
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    entry = trt_mod.build_engine(art, "fp16", max_batch=2, max_seq=64, workspace_gb=1)
    assert (art / entry["file"]).stat().st_size > 0 and entry["tensorrt"] == trt.__version__
    assert np.isfinite(entry["seconds"])
