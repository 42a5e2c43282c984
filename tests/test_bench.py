"""The benchmark runs and reports (its numbers are read by people, never asserted on)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest

import gpunet
from gpunet import bench
from gpunet.cli import main
from standin import standin_env

# a sweep of the real workloads at shapes small enough to take a second
TINY_SWEEPS = {"lstm-seq": bench.Sweep("lstm", "seq", (2, 4), "LSTM over sequence length"),
               "bn-batch": bench.Sweep("bn", "batch", (2, 4), "bn over batch size")}


def test_bench_reports_every_field(tmp_path, capsys):
    out = tmp_path / "b.json"
    # isolate mode, the default: one round of one fresh process per framework
    assert main(["bench", "mlp", "--steps", "2", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["workload"] == "mlp" and result["mode"] == "isolate"
    assert report["environment"]["mode"] == "isolate" and report["environment"]["rounds"] == 1
    (first,) = result["rounds"]
    assert first["order"][0] == "gpunet" and first["gpunet"]["train"]["median_ms"] > 0
    for key in ("median_ms", "min_ms", "max_ms"):
        assert result["gpunet"]["train"][key] > 0 and result["gpunet"]["infer"][key] > 0
    assert result["gpunet"]["peak_mb"] > 0
    if report["environment"]["torch"]:  # the peer is optional: CI does not install PyTorch
        assert result["ratio_train"] > 0 and result["torch"]["peak_mb"] > 0
    assert "blas_threads" in report["environment"] and "sweep" not in report
    assert "mlp" in capsys.readouterr().out
    assert set(bench.WORKLOADS) >= {"mlp"}


def test_workload_shapes_are_parameters_of_one_definition():
    assert bench.workload("lstm").description == bench.WORKLOADS["lstm"].description
    w = bench.workload("lstm", batch=8, seq=100)
    assert w.x_shape == (8, 100, 64) and w.target_shape == (8, 1)
    assert w.gpunet_model is bench.WORKLOADS["lstm"].gpunet_model
    assert bench.workload("bn", batch=16).x_shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="no sequence length"):
        bench.workload("bn", seq=10)
    with pytest.raises(ValueError, match="unknown workload"):
        bench.workload("resnet")


def test_sweep_has_one_row_per_size_in_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "peak_memory",  # its own test is above
                        lambda *a, **k: {"peak_mb": 1.0})
    rows = bench.sweep(steps=2, warmup=1)
    assert [(r["sweep"], r["size"]) for r in rows] == [
        ("lstm-seq", 2), ("lstm-seq", 4), ("bn-batch", 2), ("bn-batch", 4)]
    assert all(r["gpunet"]["median_ms"] > 0 for r in rows)
    assert rows[1]["description"].startswith("batch 32, 4 steps")
    assert "lstm-seq" in bench.sweep_table(rows)

    out = tmp_path / "b.json"
    # isolate mode: the sweep runs in a child process, given the sweeps to run (the
    # workloads' own children are tested above)
    monkeypatch.setattr(bench, "measure_isolated", lambda name, *a, **k: {
        "workload": name, "gpunet": {"train": {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0}}})
    assert main(["bench", "mlp", "--steps", "1", "--sweep", "--sweep-steps", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["size"] for r in report["sweep"]] == [2, 4, 2, 4]
    assert "bn-batch" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: {"peak_mb": 1.0})
    png = tmp_path / "b.png"
    assert main(["bench", "mlp", "--in-process", "--steps", "1", "--sweep-steps", "1",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_pytorch_shows_gpunet_alone(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "_import_torch", lambda: None)
    rows = bench.sweep(steps=1, warmup=0)
    assert all("torch" not in r and "ratio" not in r for r in rows)
    result = {"workload": "mlp", "device": "cpu", "gpunet": {}}  # what measure() gives then
    png = tmp_path / "b.png"
    bench.plot([result], rows, bench.environment(), str(png))
    assert png.stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes its import fail
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before failing"))
    monkeypatch.setattr(bench, "measure_isolated",
                        lambda *a, **k: pytest.fail("measured before failing"))
    with pytest.raises(SystemExit) as e:
        bench.main(["mlp", "--plot", "b.png"])
    assert e.value.code == 2
    assert 'pip install "gpunet[bench]"' in capsys.readouterr().err


def test_reexec_sets_the_blas_and_idle_variables():
    command = ["python", "-m", "gpunet", "bench", "--threads", "2"]
    argv, env = bench.reexec_environment(2, {"PATH": "/bin", "OMP_NUM_THREADS": "8"}, command)
    assert argv == [sys.executable, "-m", "gpunet", "bench", "--threads", "2"]
    assert env == {"PATH": "/bin", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
                   "MKL_NUM_THREADS": "2", "GPUNET_NUM_THREADS": "2",
                   "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    # the re-run finds them set and goes on instead of re-running itself
    assert bench.reexec_environment(2, env, command) is None
    # without --threads only the idle policy is set, and a caller's own choice is kept
    argv, env = bench.reexec_environment(None, {"OMP_WAIT_POLICY": "ACTIVE"}, command)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    assert bench.reexec_environment(None, env, command) is None


class _Exec(Exception):
    pass


def test_threads_option_re_executes_the_command_line(monkeypatch):
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec  # instead of replacing the test process

    monkeypatch.setattr(bench.os, "execve", execve)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "GPUNET_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    # as `gpunet bench mlp --threads 1`: the console script is sys.argv[0]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gpunet", "bench", "mlp", "--in-process",
                                      "--threads", "1"])
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", *sys.argv])
    with pytest.raises(_Exec):
        main(sys.argv[1:])
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "/venv/bin/gpunet", "bench", "mlp", "--in-process",
                    "--threads", "1"]
    assert (env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"]
            == env["GPUNET_NUM_THREADS"] == "1")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OPENBLAS_THREAD_TIMEOUT"] == "4"


def test_threads_in_process_does_not_re_execute(monkeypatch, capsys):
    monkeypatch.setattr(bench.os, "execve", lambda *a: pytest.fail("re-executed"))
    monkeypatch.setattr(bench, "measure", lambda *a, **k: {"workload": "mlp", "gpunet": {
        "train": {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0}}})
    assert bench.main(["mlp", "--in-process", "--threads", "1"]) == 0
    assert "limits PyTorch only" in capsys.readouterr().err


# -- GPUs: the same GPU in both frameworks, device memory, synchronised timing --------------
class _FakeTorch:
    """Just enough of ``torch`` for the device mapping: ``torch.device(type, index)``."""

    def __init__(self, cuda_available: bool = True) -> None:
        self.__version__ = "0.fake"
        self.cuda = SimpleNamespace(is_available=lambda: cuda_available)

    @staticmethod
    def device(kind: str, index: int | None = None):
        return SimpleNamespace(type=kind, index=index)


@pytest.mark.parametrize("spec, want", [("cuda:1", ("cuda", 1)), ("cuda", ("cuda", 0)),
                                        ("CUDA:3", ("cuda", 3)), ("cpu", ("cpu", None)),
                                        ("emulated", ("cpu", None))])
def test_each_gpunet_device_maps_to_the_same_device_in_pytorch(spec, want):
    dev = bench.torch_device(_FakeTorch(), spec)
    assert (dev.type, dev.index) == want
    torch = bench._import_torch()
    if torch is not None:  # the real constructor takes the same arguments, GPU or not
        assert bench.torch_device(torch, spec) == torch.device(*[w for w in want if w is not None])


def test_a_bad_gpu_index_is_a_device_error():
    with pytest.raises(gpunet.DeviceError, match="cuda:N"):
        bench.cuda_index("cuda:x")


def test_pytorch_is_left_out_with_the_reason():
    assert bench.torch_skipped(None, "cpu") == "PyTorch is not installed"
    assert bench.torch_skipped(_FakeTorch(cuda_available=False), "cuda:0") == \
        "this PyTorch (0.fake) has no CUDA"
    assert bench.torch_skipped(_FakeTorch(cuda_available=False), "cpu") is None
    assert bench.torch_skipped(_FakeTorch(), "cuda:1") is None
    assert "stand-in" in bench.torch_skipped(_FakeTorch(), "cuda:1", standin=True)


class _Recorder:
    def __init__(self, log: list) -> None:
        self.log = log

    def sync(self) -> None:
        self.log.append("sync")

    def train_step(self) -> None:
        self.log.append("step")
        self.sync()  # as the runners end each step


def test_each_timed_step_starts_and_ends_with_a_device_synchronisation():
    log: list[str] = []
    times = bench._alternate({"gpunet": _Recorder(log)}, steps=2, warmup=0,
                             phases=("train_step",))
    assert log == ["sync", "step", "sync"] * 2 and len(times["gpunet"]["train_step"]) == 2


def test_pytorch_gpu_peak_is_max_memory_allocated_of_the_same_gpu(monkeypatch):
    calls = []
    allocated = iter([1 * 2**20, 0])  # before the model; unused after

    def record(name, value=None):
        def f(dev):
            calls.append((name, dev.type, dev.index))
            return value() if callable(value) else value
        return f

    torch = _FakeTorch()
    torch.cuda = SimpleNamespace(
        memory_allocated=record("memory_allocated", lambda: next(allocated)),
        reset_peak_memory_stats=record("reset_peak_memory_stats"),
        max_memory_allocated=record("max_memory_allocated", 65 * 2**20),
        max_memory_reserved=record("max_memory_reserved", 96 * 2**20))

    class Runner:
        def __init__(self, w, device, torch_):
            calls.append(("build", device))

        def train_step(self):
            calls.append(("step",))

    monkeypatch.setattr(bench, "_TorchRunner", Runner)
    peak = bench._gpu_peak_torch(bench.WORKLOADS["mlp"], "cuda:1", torch, steps=2)
    assert peak == {"peak_mb": 64.0, "reserved_peak_mb": 96.0}
    assert calls == [("memory_allocated", "cuda", 1), ("build", "cuda:1"), ("step",),
                     ("reset_peak_memory_stats", "cuda", 1), ("step",), ("step",),
                     ("max_memory_allocated", "cuda", 1), ("max_memory_reserved", "cuda", 1)]


def test_gpunet_gpu_peak_is_what_cupys_pool_holds_on_that_gpu(standin):
    w = bench.workload("mlp", batch=2)
    peak = bench._gpu_peak_gpunet(w, "cuda:1")
    params = (784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10) * 4 / 2**20
    # weights, their gradients and SGD's momentum at least, then activations and temporaries
    assert 3 * params < peak["peak_mb"] < 6 * params
    assert 3 * params <= peak["pool_used_after_mb"] <= peak["peak_mb"]
    pool = standin.get_default_memory_pool()
    with standin.cuda.Device(0):
        assert pool.total_bytes() == 0  # nothing landed on GPU 0


def test_gpu_peak_memory_in_a_subprocess(monkeypatch):
    env = standin_env()
    for key in ("PYTHONPATH", "GPUNET_STANDIN_GPUS", "GPUNET_STANDIN_NCCL"):
        monkeypatch.setenv(key, env[key])
    peak = bench.peak_memory("lstm", "gpunet", "cuda:0", batch=2, seq=3)
    assert peak["peak_mb"] > 0 and bench.peak_method("gpunet", "cuda:0").startswith("CuPy")
    assert bench.peak_method("torch", "cuda:0").startswith("torch.cuda.max_memory_allocated")
    assert bench.peak_method("gpunet", "cpu").startswith("resident-set")


@pytest.mark.parametrize("mode", [[], ["--in-process"]])
def test_users_are_refused_the_standin(mode):
    done = subprocess.run([sys.executable, "-m", "gpunet", "bench", "mlp", "--device", "cuda:0",
                           "--steps", "1", *mode], env=standin_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "CuPy stand-in, not a GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_gpu_check_may_run_the_standin_and_every_figure_is_labelled(standin, monkeypatch):
    with pytest.raises(gpunet.DeviceError, match="stand-in, not a GPU"):
        bench.measure("mlp", "cuda:1", steps=1, warmup=0)
    with pytest.raises(gpunet.DeviceError, match="stand-in, not a GPU"):
        bench.measure_isolated("mlp", "cuda:1", steps=1, warmup=0, rounds=1)
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: {"peak_mb": 1.0})
    result = bench.measure("mlp", "cuda:1", steps=1, warmup=0, batch=2, allow_standin=True)
    assert result["standin"] and result["label"] == bench.STANDIN_LABEL
    assert "means nothing" in bench.STANDIN_LABEL
    assert result["description"].startswith("batch 2,") and "torch" not in result
    assert "stand-in" in result["torch_skipped"]
    assert bench.table([result]).startswith(f"# {bench.STANDIN_LABEL}")
    env = bench.environment("cuda:1")
    assert env["standin"] and env["gpu"] == "gpunet CuPy stand-in (not a GPU)"


# -- isolate mode: each framework alone in a fresh process per round, as users run it -------
def test_round_orders_alternate_which_framework_goes_first():
    assert bench.round_orders(["gpunet", "torch"], 4) == [
        ["gpunet", "torch"], ["torch", "gpunet"], ["gpunet", "torch"], ["torch", "gpunet"]]
    assert bench.round_orders(["gpunet"], 2) == [["gpunet"], ["gpunet"]]


class _FakeChildren:
    """Stands in for ``bench._child``: records each child's code and environment and answers
    with the next training median of its framework."""

    def __init__(self, train: dict[str, list[float]]) -> None:
        self.train = {k: iter(v) for k, v in train.items()}
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, code, env, what):
        self.calls.append((code, dict(env)))
        framework = "torch" if "'torch'" in code else "gpunet"
        ms = next(self.train[framework])
        stats = {"median_ms": ms, "min_ms": ms / 2, "max_ms": ms * 2}
        return {"train": stats, "infer": dict(stats),
                "runtime": {"threadpools": None, "framework": framework}}


def test_isolate_reports_every_rounds_ratio_and_their_median(monkeypatch):
    children = _FakeChildren({"gpunet": [10.0, 30.0, 12.0], "torch": [10.0, 20.0, 6.0]})
    monkeypatch.setattr(bench, "_child", children)
    monkeypatch.setattr(bench, "_import_torch", lambda: _FakeTorch())
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: {"peak_mb": 2.0})
    result = bench.measure_isolated("mlp", steps=1, warmup=0, rounds=3)
    assert result["ratios_train"] == [1.0, 1.5, 2.0]
    assert result["ratio_train"] == statistics.median(result["ratios_train"]) == 1.5
    assert [r["order"] for r in result["rounds"]] == [["gpunet", "torch"], ["torch", "gpunet"],
                                                      ["gpunet", "torch"]]
    frameworks = ["torch" if "'torch'" in code else "gpunet" for code, _ in children.calls]
    assert frameworks == ["gpunet", "torch", "torch", "gpunet", "gpunet", "torch"]
    # the rounds' stats pooled: median of medians, least minimum, most maximum
    assert result["gpunet"]["train"] == {"median_ms": 12.0, "min_ms": 5.0, "max_ms": 60.0}
    assert result["runtime"]["torch"]["framework"] == "torch"
    assert all("runtime" not in r[k] for r in result["rounds"] for k in ("gpunet", "torch"))
    assert result["ratio_memory"] == 1.0
    line = bench.table([result]).splitlines()[-1]
    assert line.endswith("1.00 1.50 2.00") and "per round" in bench.table([result])


def test_isolate_children_use_the_users_defaults():
    env = bench.child_environment(None, None, {"PATH": "/bin"})
    assert env == {"PATH": "/bin"}  # no OMP_WAIT_POLICY, no OPENBLAS_THREAD_TIMEOUT


def test_isa_avx2_sets_the_kernel_caps_in_the_childrens_environment():
    """Both frameworks' libraries, and gpunet's compiled loops (built for haswell)."""
    env = bench.child_environment(None, "avx2", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "GPUNET_CPU_ARCH": "haswell"}
    assert "approximation of an AVX2-only CPU, not one" in bench.ISA_LABELS["avx2"]


def test_isa_is_refused_in_process(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["mlp", "--in-process", "--isa", "avx2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [
        "gpunet bench: error: --isa works only in isolate mode (the default), not with "
        "--in-process"]
    assert "Traceback" not in err


def test_threads_in_isolate_mode_go_into_the_childrens_environment(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(bench.os, "execve", lambda *a: pytest.fail("re-executed"))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "GPUNET_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    children = _FakeChildren({"gpunet": [2.0], "torch": [1.0]})
    monkeypatch.setattr(bench, "_child", children)
    peaks = []
    monkeypatch.setattr(bench, "peak_memory",
                        lambda *a, **k: peaks.append(k["env"]) or {"peak_mb": 1.0})
    out = tmp_path / "b.json"
    assert bench.main(["mlp", "--threads", "1", "--rounds", "1", "--json", str(out)]) == 0
    for env in [env for _, env in children.calls] + peaks:
        assert (env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"]
                == env["GPUNET_NUM_THREADS"] == "1")
        assert "OMP_WAIT_POLICY" not in env or env["OMP_WAIT_POLICY"] == os.environ.get(
            "OMP_WAIT_POLICY")
    # the PyTorch child is told the number for torch.set_num_threads
    assert any("_time_child('mlp', 'torch', 'cpu', 30, 5, 1," in code
               for code, _ in children.calls) or bench._import_torch() is None
    report = json.loads(out.read_text())
    assert report["environment"]["blas_threads"] == "1"
    assert report["environment"]["variables"]["GPUNET_NUM_THREADS"] == "1"
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # this process is left as it was


def test_busy_neighbours_run_during_the_block_and_are_gone_after(monkeypatch):
    with bench.busy_neighbours(1) as procs:
        (proc,) = procs
        assert proc.poll() is None  # spinning
    assert proc.returncode is not None  # killed and reaped
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    with pytest.raises(KeyboardInterrupt):
        with bench.busy_neighbours(1) as procs:
            raise KeyboardInterrupt
    assert procs[0].returncode is not None


def test_busy_option_keeps_a_neighbour_while_measuring(tmp_path, monkeypatch, capsys):
    seen = []
    real = bench.busy_neighbours

    def spy(n):
        seen.append(n)
        return real(n)

    alive = []

    def measure_isolated(name, *a, **k):
        alive.append(sum(1 for p in _children_of(os.getpid()) if p))
        return {"workload": name, "gpunet": {"train": {"median_ms": 1.0, "min_ms": 1.0,
                                                       "max_ms": 1.0}}}

    monkeypatch.setattr(bench, "busy_neighbours", spy)
    monkeypatch.setattr(bench, "measure_isolated", measure_isolated)
    out = tmp_path / "b.json"
    assert bench.main(["mlp", "--busy", "1", "--json", str(out)]) == 0
    assert seen == [1] and alive == [1]
    assert json.loads(out.read_text())["environment"]["busy"] == 1
    assert "busy neighbours 1" in capsys.readouterr().out
    assert _children_of(os.getpid()) == []  # stopped after


def _children_of(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid`` (Linux's /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def test_environment_records_the_machine():
    env = bench.environment()
    for key in ("cpu", "cpu_vendor", "cpu_family", "cpu_model", "cpu_flags", "caches",
                "cpus_usable", "loadavg", "blas", "runtime", "variables"):
        assert key in env
    assert set(env["cpu_flags"]) <= set(bench.ISA_FLAGS)
    assert set(bench.RECORDED_VARS) <= set(env["variables"])
    assert "ATEN_CPU_CAPABILITY" in env["variables"] and "OPENBLAS_CORETYPE" in env["variables"]
    if os.path.exists("/sys/devices/system/cpu/cpu0/cache/index0"):
        assert any(k.startswith("L1") for k in env["caches"])
    if sys.platform == "linux":
        assert env["cpus_usable"] == len(os.sched_getaffinity(0)) and env["loadavg"]
    if env["torch"]:
        assert env["torch_cpu_capability"] and env["torch_parallel_info"]
    assert env["cpu"] in bench.machine_summary(env)


def test_isolate_mode_runs_gpunet_on_a_gpu_in_its_own_process(standin, monkeypatch):
    env = standin_env()  # the stand-in here (the fixture) and in the child (its environment)
    for key in ("PYTHONPATH", "GPUNET_STANDIN_GPUS", "GPUNET_STANDIN_NCCL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: {"peak_mb": 1.0})
    result = bench.measure_isolated("mlp", "cuda:1", steps=1, warmup=0, rounds=1, batch=2,
                                    allow_standin=True)
    assert result["standin"] and "stand-in" in result["torch_skipped"]
    assert result["gpunet"]["train"]["median_ms"] > 0 and "ratio_train" not in result


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps and --sweep-steps must be at least 1"),
    (["--sweep-steps", "0"], "--steps and --sweep-steps must be at least 1"),
    (["--busy", "-1"], "--busy must be at least 0"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_counts_are_one_line_and_status_2(args, message, monkeypatch, capsys):
    """Refused before anything is measured (--steps 0 was a StatisticsError traceback)."""
    monkeypatch.setattr(bench, "measure_isolated",
                        lambda *a, **k: pytest.fail("measured before failing"))
    with pytest.raises(SystemExit) as e:
        bench.main(["mlp", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"gpunet bench: error: {message}" and "Traceback" not in "".join(err)
