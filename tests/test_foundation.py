"""Package foundation: layout, backend selection, patch registry, checkpoints, CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastbridge
from fastbridge import _backend
from fastbridge.modules import BottleneckAdapter

from conftest import INTERPRET, needs_kernels

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- layout
def test_kernels_live_in_the_fastbridge_namespace(tmp_path):
    import fastbridge.kernels.adapter_block as k

    assert Path(k.__file__).resolve().parent == (REPO / "kernels").resolve()
    # The installed package must not provide a top-level `kernels` (Hugging Face's package name, which
    # transformers probes): checked from a neutral directory, whatever way pytest was started.
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "from transformers.utils.import_utils import is_kernels_available as k; "
            "print(json.dumps([None if s is None else str(s.origin), k()]))")
    env = {k_: v for k_, v in os.environ.items() if k_ != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         check=True).stdout
    origin, hf_kernels = __import__("json").loads(out)
    # (HF's own package may live inside the checkout, e.g. CI's .ci-venv: only the top-level kernels/ is wrong)
    assert origin is None or not Path(origin).resolve().is_relative_to((REPO / "kernels").resolve()), origin
    assert origin is not None or hf_kernels is False


def _clean_env():
    return {k_: v for k_, v in os.environ.items() if k_ != "PYTHONPATH"}


def test_repo_root_does_not_shadow_hf_kernels():
    """transformers >= 5.25 imports Hugging Face's `kernels`; started from the repository root (where
    `python -m pytest`, `python -c`, notebooks put the root on sys.path) the top-level kernels/ folder must
    not be what `import kernels` finds (it has no __init__.py on purpose, see kernels/README.md)."""
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow HF's `kernels`"
    code = ("import kernels, importlib.util; "
            "assert kernels.__file__ is None or not kernels.__file__.startswith(%r), kernels.__file__; "
            "from transformers import LlamaForCausalLM; "
            "import fastbridge.kernels.gated_attention as g; print(g.__name__)") % str(REPO / "kernels")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "fastbridge.kernels.gated_attention"


def test_python_m_pytest_from_the_repo_root():
    """`python -m pytest tests/<file>` from the root (sys.path[0] = the root) imports transformers models."""
    env = {**_clean_env(), "FASTBRIDGE_CHILD_PYTEST": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_foundation.py", "-k", "child_imports_transformers_model"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "1 passed" in r.stdout, r.stdout[-2000:]


@pytest.mark.skipif(os.environ.get("FASTBRIDGE_CHILD_PYTEST") != "1", reason="runs inside test_python_m_pytest_from_the_repo_root")
def test_child_imports_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=32))


def test_compile_caches_are_keyed_by_the_op_sources(tmp_path):
    """torch.compile's on-disk caches key a custom op by name only; fastbridge tags the inductor config
    (part of every cache key) with a hash of the sources defining its ops, so a graph compiled against
    other op code (an older fastbridge, an edited kernel) is never reused."""
    import torch._inductor.config as ic

    from fastbridge import _build, kernels
    from fastbridge.ops import source_tag

    ops_dir = Path(fastbridge.ops.__file__).parent
    want = source_tag([ops_dir, *map(Path, kernels.__path__), _build.csrc_dir()])
    assert ic.unsafe_marked_cacheable_functions["torch.ops.fastbridge"] == f"fastbridge {fastbridge.__version__} {want}"
    for name in ("op.py", "kernel.cu", "host.h", "cpu.cpp"):
        (tmp_path / name).write_text("// v1\n")
    before = source_tag([tmp_path])
    for name in ("op.py", "kernel.cu", "host.h", "cpu.cpp"):
        (tmp_path / name).write_text("// v2\n")
        after = source_tag([tmp_path])
        assert after != before, name
        before = after


def test_one_reference_per_op():
    from fastbridge import reference

    for op in ("adapter_block", "gated_attention", "qformer_cross_attention"):
        assert callable(getattr(reference, op))


# ------------------------------------------------------------------------------------- backend selection
def _adapter_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, dtype=dtype)
    return (x, torch.randn(4, 16, generator=g, dtype=dtype), None, torch.randn(16, 4, generator=g, dtype=dtype),
            None)


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"fastbridge.use_backend\(name\): expected one of"):
        with fastbridge.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTBRIDGE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTBRIDGE_BACKEND: expected one of"):
        fastbridge.ops.adapter_block(*_adapter_args())


def test_use_backend_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("FASTBRIDGE_BACKEND", "reference")
    assert fastbridge.current_backend() == "reference"
    with fastbridge.use_backend("kernel"):
        assert fastbridge.current_backend() == "kernel"
        with fastbridge.use_backend("auto"):
            assert fastbridge.current_backend() == "auto"
        assert fastbridge.current_backend() == "kernel"
    assert fastbridge.current_backend() == "reference"


def test_forced_kernel_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    with fastbridge.use_backend("kernel"):
        with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            fastbridge.ops.adapter_block(*_adapter_args())
    with fastbridge.use_backend("kernel"), pytest.raises(_backend.BackendUnavailableError, match="float64"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        fastbridge.ops.adapter_block(*_adapter_args(torch.float64))


def test_auto_falls_back_once_with_a_warning_and_same_result(monkeypatch):
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_warned", set())
    args = _adapter_args()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = fastbridge.ops.adapter_block(*args)
        y2 = fastbridge.ops.adapter_block(*args)
    fb = [x for x in w if issubclass(x.category, fastbridge.FastbridgeFallbackWarning)]
    assert len(fb) == 1 and "only speed and memory differ" in str(fb[0].message)
    torch.testing.assert_close(y1, fastbridge.reference.adapter_block(*args))
    torch.testing.assert_close(y1, y2)


def test_fallback_warning_points_at_the_users_call_site(monkeypatch):
    """The one-time warning names the user's line, not torch/nn/modules/module.py or fastbridge."""
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)  # env changes confuse triton
    monkeypatch.setattr(_backend, "_warned", set())
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model(torch.randn(3, 8)); line = sys._getframe().f_lineno  # noqa: E702
    fb = [x for x in w if issubclass(x.category, fastbridge.FastbridgeFallbackWarning)]
    assert len(fb) == 1
    assert (fb[0].filename, fb[0].lineno) == (__file__, line)


def test_import_does_not_load_dynamo():
    """``import fastbridge`` stays light: torch._dynamo (about 1 s) is imported only where compiling needs
    it; torch.compile's cache tag is still applied when inductor's config is imported."""
    code = ("import sys, fastbridge; print('torch._dynamo' in sys.modules); import torch._inductor.config as c; "
            "print(c.unsafe_marked_cacheable_functions.get('torch.ops.fastbridge', '')[:10])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()
    assert out == ["False", "fastbridge"], out


def test_assume_constant_marks_like_torch():
    """_backend.assume_constant sets exactly what torch.compiler.assume_constant_result sets (without
    importing torch._dynamo), and a compiled op stays one graph."""
    def f():
        return 1

    def g():
        return 1

    torch.compiler.assume_constant_result(f)
    _backend.assume_constant(g)
    assert {k: v for k, v in vars(f).items()} == {k: v for k, v in vars(g).items()} != {}


# ------------------------------------------------------------------------------------------------ stats
@pytest.fixture
def fresh_stats():
    fastbridge.reset_stats()
    yield
    fastbridge.reset_stats()


def test_stats_count_what_each_call_ran(monkeypatch, fresh_stats):
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4))
    other = BottleneckAdapter(8, 2)
    assert str(fastbridge.stats()).startswith("fastbridge.stats: no calls recorded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastbridge.FastbridgeFallbackWarning)
        for _ in range(3):
            model(torch.randn(2, 8))
        with fastbridge.use_backend("reference"):
            model(torch.randn(2, 8))
        fastbridge.patch(model)
        fastbridge.unpatch(model)
        model(torch.randn(2, 8))
        other(torch.randn(2, 8).double())  # another model: the counts are process-wide
    s = fastbridge.stats(model)["fastbridge.BottleneckAdapter"]
    # CPU without TRITON_INTERPRET: the reference runs, with the reason; unpatched: the eager composition
    assert (s.fused, s.reference, s.fallbacks, s.total) == (0, 5, 1, 6)
    assert s.reference_reasons == {"backend 'reference' selected": 1,
                                   "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1": 4}
    text = str(fastbridge.stats(model))
    assert "6 calls: 0 fused, 5 reference, 1 fallback" in text and "fused=False" in text
    assert fastbridge.stats().as_dict()["fastbridge.BottleneckAdapter"]["total"] == 6
    fastbridge.reset_stats()
    assert fastbridge.stats(model)["fastbridge.BottleneckAdapter"].total == 0


@needs_kernels
def test_stats_count_fused_calls(fresh_stats):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = BottleneckAdapter(16, 4).to(device)
    m(torch.randn(3, 16, device=device))
    assert fastbridge.stats(m)["fastbridge.BottleneckAdapter"].fused == 1


def test_stats_under_torch_compile_no_graph_break(monkeypatch, fresh_stats):
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    m = BottleneckAdapter(8, 4)
    x = torch.randn(2, 8)
    with fastbridge.use_backend("reference"):
        torch._dynamo.reset()
        y = torch.compile(m, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(y, m(x))
    assert fastbridge.stats(m)["fastbridge.BottleneckAdapter"].total == 1  # the eager call only


def test_stats_of_the_qformer_attention(fresh_stats):
    """The "fastbridge" transformers attention counts fused calls and SDPA fallbacks (with the reason);
    fastbridge.stats(model) of a patched BLIP-2 shows them."""
    from fastbridge.integrations import transformers as FT
    from fastbridge.ops.qformer_cross_attention import ensure_loaded
    from test_qformer_integration import blip2

    ensure_loaded()
    model, inputs = blip2("cpu")
    fastbridge.patch(model)
    assert "transformers.QFormer x1: kernel (C++ extension, cpu)" in str(model.fastbridge_report)
    with torch.no_grad():
        model(**inputs)
    n_layers = model.config.qformer_config.num_hidden_layers
    s = fastbridge.stats(model)
    assert set(s) >= {"transformers.QFormer", fastbridge._stats.ATTENTION}
    att = s[fastbridge._stats.ATTENTION]
    assert att.fused >= n_layers and att.fallbacks == 0  # self- (and cross-) attention of every layer

    causal = nn.Module()
    causal.is_causal = True
    q = torch.randn(1, 2, 3, 8)
    FT.fastbridge_attention_forward(causal, q, q, q, None)
    with fastbridge.use_backend("reference"):
        FT.fastbridge_attention_forward(nn.Module(), q, q, q, None)
    att2 = fastbridge.stats(model)[fastbridge._stats.ATTENTION]
    assert (att2.fused, att2.reference) == (att.fused, 1)
    assert list(att2.fallback) == ["transformers' SDPA: causal attention (the kernels implement bidirectional "
                                   "Q-Former attention)"]


def test_auto_fallback_compiles_without_graph_break(monkeypatch, fresh_stats):
    """"auto" falling back to the reference under torch.compile(fullgraph=True): the one-time warning is
    not traced (it used to break the graph: warnings.warn is skipped by dynamo); the eager call warns."""
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    monkeypatch.setattr(_backend, "_warned", set())
    m = BottleneckAdapter(8, 4)
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = torch.compile(m, fullgraph=True, backend="eager")(x)
        assert not [i for i in w if issubclass(i.category, fastbridge.FastbridgeFallbackWarning)]
        torch.testing.assert_close(y, m(x))
    assert len([i for i in w if issubclass(i.category, fastbridge.FastbridgeFallbackWarning)]) == 1


def test_patch_report_says_which_backend_will_run(monkeypatch):
    monkeypatch.delenv("FASTBRIDGE_BACKEND", raising=False)
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4))
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    fastbridge.patch(model)
    text = str(model.fastbridge_report)
    assert "fastbridge.BottleneckAdapter x1: reference on cpu" in text and "TRITON_INTERPRET=1" in text
    assert "fused now" not in text and "fastbridge.stats(model)" in text
    monkeypatch.setattr(_backend, "triton_interpret", lambda: True)
    fastbridge.unpatch(model)
    fastbridge.patch(model)
    assert "fastbridge.BottleneckAdapter x1: kernel (Triton interpreter, cpu" in str(model.fastbridge_report)
    with fastbridge.use_backend("reference"):
        fastbridge.unpatch(model)
        fastbridge.patch(model)
    assert "reference on cpu (backend 'reference' selected)" in str(model.fastbridge_report)


# ----------------------------------------------------------------------------------------------- module
def test_new_adapter_is_identity_and_presets():
    x = torch.randn(2, 5, 32)
    for preset in ("houlsby", "pfeiffer", "blip"):
        m = BottleneckAdapter.from_preset(preset, 32, **({"r": 8} if preset == "blip" else {}))
        with fastbridge.use_backend("reference"):
            assert torch.equal(m(x), x)
    assert BottleneckAdapter.houlsby(768).r == 48 and BottleneckAdapter.houlsby(768).activation == "silu"
    assert BottleneckAdapter.pfeiffer(768).activation == "relu"
    assert BottleneckAdapter.from_preset("blip", 768).r == 64
    with pytest.raises(ValueError, match="'preset' must be one of"):
        BottleneckAdapter.from_preset("lora", 32)
    with pytest.raises(ValueError, match="'r' or a 'reduction_factor'"):
        BottleneckAdapter(32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_fused_module_equals_eager_module(backend):
    if backend == "kernel" and not INTERPRET:
        pytest.skip("CPU kernel test needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    m = BottleneckAdapter(24, 6, layer_norm=True, gate=True, learnable_scale=True, scale=0.7, activation="silu")
    with torch.no_grad():
        m.up.weight.normal_()
        m.gate.fill_(0.3)
    x = torch.randn(3, 7, 24, requires_grad=True)
    with fastbridge.use_backend(backend):
        y = m(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    fastbridge.unpatch(fastbridge.patch(m))  # -> eager composition
    assert m.fused is False
    y2 = m(x)
    grads2 = torch.autograd.grad(y2.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fp32_params_with_half_activations():
    m = BottleneckAdapter(16, 4, gate=True)
    x = torch.randn(5, 16, dtype=torch.float16)
    with fastbridge.use_backend("reference"):
        y = m(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert m.gate.grad is not None and m.gate.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ patch
def test_patch_is_idempotent_reports_and_unpatch_restores():
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4), nn.ReLU(), BottleneckAdapter(8, 2))
    assert fastbridge.patch(model) is model
    assert model.fastbridge_report.counts == {"fastbridge.BottleneckAdapter": 2}
    assert "2 module(s) newly patched" in str(model.fastbridge_report)
    fastbridge.patch(model)
    assert len(model.fastbridge_report.patched) == 0 and len(model.fastbridge_report.already) == 2
    fastbridge.unpatch(model)
    assert not model[1].fused and not hasattr(model, "fastbridge_report")
    fastbridge.patch(model)
    assert model[1].fused and model[3].fused


def test_patch_leaves_unsupported_modules_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastbridge.patch(model)
    assert "nothing to patch" in str(model.fastbridge_report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module"):
        fastbridge.patch("bert")


# ------------------------------------------------------------------------------------------ checkpoints
def test_save_and_load_trainable_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4, gate=True))
    model[0].requires_grad_(False)
    with torch.no_grad():
        for p in model[1].parameters():
            p.normal_()
    path = tmp_path / "bridge.safetensors"
    saved = fastbridge.save_trainable(model, path)
    assert set(saved) == {"1.down.weight", "1.down.bias", "1.up.weight", "1.up.bias", "1.gate"}
    fresh = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4, gate=True))
    fresh[0].requires_grad_(False)
    fastbridge.load_trainable(fresh, path)
    for k, v in model[1].state_dict().items():
        assert torch.equal(fresh[1].state_dict()[k], v), k


def test_load_trainable_is_strict(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4))
    path = tmp_path / "a.safetensors"
    fastbridge.save_trainable(model, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        fastbridge.load_trainable(nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 2)), path)
    with pytest.raises(ValueError, match="missing from the file"):
        fastbridge.load_trainable(nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 4, gate=True)), path)
    with pytest.raises(ValueError, match="does not have"):
        fastbridge.load_trainable(nn.Sequential(nn.Linear(8, 8)), path)
    with pytest.raises(FileNotFoundError, match="'path'"):
        fastbridge.load_trainable(model, tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by fastbridge.save_trainable"):
        fastbridge.load_trainable(model, tmp_path / "other.safetensors")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        fastbridge.save_trainable(frozen, tmp_path / "b.safetensors")


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_info_runs_as_module_and_script():
    env = {**os.environ, "FASTBRIDGE_BACKEND": "auto"}
    out = subprocess.run([sys.executable, "-m", "fastbridge", "info"], capture_output=True, text=True, env=env,
                         cwd=str(REPO / "tests"), check=True).stdout
    assert "torch" in out and "triton" in out and "can run here:" in out and "reference (eager PyTorch)" in out


# ------------------------------------------------------------------------------------------------ bench
def test_bench_help_says_what_it_takes(capsys):
    from fastbridge.cli import main

    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("passed to pytest", "-k EXPR", "--fb-quick", "--fb-results-dir DIR", "~/.cache/fastbridge/bench"):
        assert needle in out, needle


def _bench_plot():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plot
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return plot


def _rec(provider, mode, ms, N=4096, peak=None):
    return {"op": "adapter_block", "provider": provider, "mode": mode, "dtype": "bf16",
            "shape": {"d": 768, "r": 16, "N": N}, "ms": {"p20": ms, "p50": ms, "p80": ms}, "peak_mb": peak}


def test_bench_compact_table_one_unit_per_column():
    plot = _bench_plot()
    recs = [_rec("fastbridge", "fwd", 0.5, peak=10.0), _rec("eager", "fwd", 1.5, peak=30.0),
            _rec("fastbridge", "bwd", 1.0, peak=12.0), _rec("eager", "bwd", 2.0, peak=40.0)]
    text = plot.compact_table(recs)
    lines = text.splitlines()
    assert lines[0] == "adapter_block, bf16"
    assert lines[1].split() == ["shape", "mode", "fastbridge", "ms", "eager", "ms", "×", "vs", "eager",
                                "fastbridge", "MB", "eager", "MB"]
    assert lines[2].split() == ["d=768", "r=16", "N=4096", "fwd", "0.5", "1.5", "3.00", "10", "30"]
    assert lines[3].split()[3:] == ["bwd", "1", "2", "2.00", "12", "40"]


def test_bench_single_size_speedup_panel_uses_bars(tmp_path):
    """A speed-up panel with one size only (a dot per series, line styles invisible) is drawn as bars
    grouped by mode, with a legend; with several sizes, lines carry a marker per mode."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = _bench_plot()
    doc = {"device": "test", "records": [_rec("fastbridge", m, 1.0) for m in plot.MODES] +
           [_rec("eager", m, 2.0 + i) for i, m in enumerate(plot.MODES)]}
    figs = []
    orig = plt.close
    plt.close = lambda fig=None: figs.append(fig)  # keep the figures to inspect them
    try:
        plot.plot_doc(doc, tmp_path / "dev.json", tmp_path)
    finally:
        plt.close = orig
    speed = figs[1].axes[0]
    assert len(speed.patches) == 3 and not speed.get_lines()[1:]  # three bars (fwd, bwd, fwd_bwd); 1.0 line
    assert [t.get_text() for t in speed.get_xticklabels()] == list(plot.MODES)
    assert speed.get_legend() is not None
    doc["records"] += [_rec("fastbridge", m, 1.0, N=8192) for m in plot.MODES] + \
        [_rec("eager", m, 3.0, N=8192) for m in plot.MODES]
    figs.clear()
    plt.close = lambda fig=None: figs.append(fig)
    try:
        plot.plot_doc(doc, tmp_path / "dev.json", tmp_path)
    finally:
        plt.close = orig
    markers = {ln.get_label(): ln.get_marker() for ln in figs[1].axes[0].get_lines() if ln.get_label()[0] != "_"}
    assert markers == {"fastbridge fwd": "o", "fastbridge bwd": "s", "fastbridge fwd_bwd": "^"}
    for f in figs:
        orig(f)


def test_bench_subset_run_shows_only_its_records_and_writes_outside_the_checkout(tmp_path):
    """`fastbridge bench -k ...` writes to ~/.cache/fastbridge/bench by default (here XDG_CACHE_HOME), and
    a later -k subset prints only the records it measured, while the file keeps both runs'."""
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name in ("FASTBRIDGE_BENCH_OUT", "FASTBRIDGE_POISON"):  # tests/conftest.py poisons kernel outputs
        env.pop(name, None)
    base = ["-m", "fastbridge", "bench", "--fb-warmup-ms", "1", "--fb-rep-ms", "2", "-p", "no:cacheprovider", "-rs",
            "-k"]
    sel = "adapter_block_cpu and blip-d768-r16-N256- and eager"
    runs = []
    for k in (f"{sel} and not bwd", f"{sel} and fwd_bwd"):
        r = subprocess.run([sys.executable, *base, k], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs.append(r.stdout)
    out = tmp_path / "cache" / "fastbridge" / "bench"
    files = list(out.glob("*.json"))
    assert len(files) == 1 and (out / "plots" / "results.md").exists()
    import json

    modes = {r["mode"] for r in json.loads(files[0].read_text())["records"]}
    assert modes == {"fwd", "fwd_bwd"}
    table = runs[1].split("benchmark records this run measured")[1]
    assert "fwd_bwd" in table and " fwd " not in table


# ----------------------------------------------------------------------------------------------- README
def test_readme_demo_section_matches_the_committed_demo_json(tmp_path):
    """README's demo tables are generated from docs/demo/*/demo.json (docs/demo/readme_demo.py)."""
    script = REPO / "docs" / "demo" / "readme_demo.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    # and the check can fail: a hand-edited number is caught
    readme = tmp_path / "README.md"
    import re

    text = (REPO / "README.md").read_text()
    start = text.index("<!-- demo:start")
    m = re.compile(r"(\d\.\d{3}) → (\d\.\d{3})").search(text, start)  # the first score in the generated tables
    edited = f"{m.group(1)} → {float(m.group(2)) + 0.111:.3f}"
    readme.write_text(text[:m.start()] + edited + text[m.end():])
    r = subprocess.run([sys.executable, str(script), "--check", "--readme", str(readme)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 1 and "out of date" in r.stderr


def test_docs_live_in_the_repository():
    """What the README links to exists in a clone; no links outside it, no issue-tracker references."""
    import re

    text = (REPO / "README.md").read_text()
    assert "../shared" not in text and not re.search(r"\bissue \d", text)
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (REPO / link).exists(), link
    assert (REPO / "docs" / "API.md").exists() and "fastbridge.stats" in (REPO / "docs" / "API.md").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text()
