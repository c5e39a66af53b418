"""The image's recipe and scripts, without building anything: the Dockerfile installs through the
Makefile's own recipe, and build.sh, smoke.sh, the SLURM script and the entrypoint are run against
stand-in container tools (small scripts on PATH that record their arguments)."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASH = shutil.which("bash")


def load_check_cuda():
    spec = importlib.util.spec_from_file_location("check_cuda", DOCKER / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for op, rest in dockerfile_instructions():
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args


def make_install_words() -> list[str]:
    runs = [rest for op, rest in dockerfile_instructions() if op == "RUN" and re.search(r"\bmake install\b", rest)]
    assert len(runs) == 1, f"expected one RUN with `make install`, found {len(runs)}"
    command = runs[0].split("make install", 1)[1].split(";")[0].split("&&")[0]
    return shlex.split(command)


# ---- the Dockerfile installs with the Makefile's recipe ----

def test_dockerfile_installs_only_through_the_makefile_recipe():
    runs = [rest for op, rest in dockerfile_instructions() if op == "RUN"]
    for run in runs:
        assert "-m venv" not in run, f"the Dockerfile makes its own venv: {run}"
        installs = re.findall(r"(?:\bpip3? install|-m pip install)((?: -\S+)*) (\S+)", run)
        # The exceptions, both only where the base has no CUDA toolkit: the CUDA crt headers (CPU
        # flavour), and nvcc with the CUDA headers as the wheels tools/cuda_wheels.py names
        # (the recipe of `make cuda-wheels`), with CUDA_WHEELS=1.
        for _, package in installs:
            assert package.startswith('"nvidia-cuda-crt==') or package == "${wheels}", \
                f"a second install recipe in the Dockerfile: {run}"
        if installs:
            assert "if ! command -v nvcc" in run
        if any(package == "${wheels}" for _, package in installs):
            assert 'wheels=$(python tools/cuda_wheels.py --dali-variant ${DALI_VARIANT})' in run
    words = make_install_words()
    assignments = dict(word.split("=", 1) for word in words)
    assert assignments["VENV_ARGS"] == "--system-site-packages"  # reuses the base image's torch
    makefile = (ROOT / "Makefile").read_text()
    for name in assignments:  # every override names a variable the Makefile really has
        assert re.search(rf"^{name} \?=", makefile, re.M), f"Makefile has no overridable {name}"


def test_make_install_as_the_image_runs_it(tmp_path):
    """`make -n` with the Dockerfile's own arguments: the recipe make would run in the image."""
    words = make_install_words()
    assignments = dict(word.split("=", 1) for word in words)
    venv = tmp_path / "venv"
    words = [w if not w.startswith("VENV=") else f"VENV={venv}" for w in words]
    words = [w.replace("${DALI_VARIANT}", dockerfile_args()["DALI_VARIANT"]) for w in words]
    result = subprocess.run(["make", "-n", "-C", str(ROOT), "install", *words], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    recipe = result.stdout
    assert f"{assignments['PYTHON']} -m venv --system-site-packages {venv}" in recipe
    assert f'"nvidia-dali-{dockerfile_args()["DALI_VARIANT"]}==' in recipe
    (install,) = [line for line in recipe.splitlines() if f"{venv}/bin/python -m pip install" in line
                  and '-e ".[demo,dev]"' in line]
    assert f'"nvidia-dali-{dockerfile_args()["DALI_VARIANT"]}==' in install  # one resolution for both
    assert f"touch {venv}/.installed-dali-" in recipe


def test_plain_make_install_is_unchanged(tmp_path):
    venv = tmp_path / "plain"
    result = subprocess.run(["make", "-n", "-C", str(ROOT), "install", f"VENV={venv}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"python3 -m venv +{re.escape(str(venv))}\n", result.stdout)
    assert "--system-site-packages" not in result.stdout


def test_dockerfile_copies_exist_and_are_not_ignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [rest for op, rest in dockerfile_instructions() if op == "COPY"]
    assert copies
    for rest in copies:
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            top = source.split("/")[0]
            assert top not in ignored, f"COPY {source}: excluded by .dockerignore"
    for must in (".venv", ".git", "demo", "runs"):
        assert must in ignored


def test_default_base_matches_dali_variant():
    args = dockerfile_args()
    check_cuda = load_check_cuda()
    base_cuda = re.search(r"cuda(\d+)\.\d+", args["BASE_IMAGE"])
    assert base_cuda, f"BASE_IMAGE {args['BASE_IMAGE']} names no CUDA version"
    assert int(base_cuda.group(1)) == check_cuda.variant_cuda_major(args["DALI_VARIANT"])
    makefile_variant = re.search(r"^DALI_VARIANT \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["DALI_VARIANT"] == makefile_variant


def test_runtime_writes_go_outside_the_image():
    env = {}
    for op, rest in dockerfile_instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    for name in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR", "RELABEL_DALI_LISTING_CACHE"):
        assert env[name].startswith("/tmp"), f"{name}={env[name]} is inside the image"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # The operator is built at image build time into the cache the runtime reads.
    assert env["RELABEL_DALI_CACHE"].startswith("/opt/")
    assert any(op == "RUN" and "load_operators()" in rest and "build_capi()" in rest
               for op, rest in dockerfile_instructions())


# ---- check_cuda.py ----

def test_variant_cuda_major():
    check_cuda = load_check_cuda()
    assert [check_cuda.variant_cuda_major(v) for v in ("cuda110", "cuda120", "cuda130")] == [11, 12, 13]
    for bad in ("cu130", "cuda", "cuda1", "CUDA130"):
        with pytest.raises(ValueError, match="expected 'cuda'"):
            check_cuda.variant_cuda_major(bad)


def test_check_cuda_rules():
    check = load_check_cuda().check
    assert check("cuda130", "13.0", "13.0", "2.4.0", require_cuda=True) == []
    assert check("cuda130", "12.8", "13.0", "2.4.0", require_cuda=True) == [
        "torch is built for CUDA 12.8, but DALI cuda130 needs CUDA 13.x"]
    assert check("cuda130", None, "13.0", "2.4.0", require_cuda=True) == [
        "torch is a CPU-only build, but DALI cuda130 needs CUDA 13"]
    assert check("cuda120", "12.4", "13.0", "2.4.0", require_cuda=True) == [
        "nvcc is CUDA 13.0, but DALI cuda120 needs CUDA 12.x"]
    assert check("cuda130", "13.0", None, "2.4.0", require_cuda=True) == [
        "nvcc not found: the operator's CUDA backend cannot be built"]
    # CPU flavour: versions are reported only, but DALI must be there.
    assert check("cuda130", "12.8", None, "2.4.0", require_cuda=False) == []
    assert check("cuda130", None, None, None, require_cuda=False) == ["nvidia-dali-cuda130 is not installed"]


def test_check_cuda_command_line():
    result = subprocess.run([sys.executable, str(DOCKER / "check_cuda.py"), "--variant", "cu13"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "DALI variant 'cu13'" in result.stderr


# ---- stand-in container tools ----

def make_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


RECORD = 'printf "%s\\n" "$(basename "$0") $*" >> "$FAKE_LOG"'


@pytest.fixture
def fakebin(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    return folder


def run_script(script: str, args: list[str], fakebin: Path, log: Path, extra_env=None, path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_TOOL", "PIP_CA")}
    env.update({"PATH": path or f"{fakebin}:{os.environ['PATH']}", "FAKE_LOG": str(log)})
    env.update(extra_env or {})
    return subprocess.run([BASH, str(DOCKER / script), *args], capture_output=True, text=True, env=env, timeout=60)


def recorded(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def fake_docker(fakebin: Path, daemon: bool = True) -> None:
    make_tool(fakebin, "docker", f"""{RECORD}
case "$1" in
  info) exit {0 if daemon else 1} ;;
  image) echo 2500000000 ;;
esac""")


def fake_buildah(fakebin: Path) -> None:
    make_tool(fakebin, "buildah", f"""{RECORD}
case "$1" in
  images) echo "1.23 GB" ;;
  from) echo fake-container ;;
esac""")


# ---- build.sh ----

def test_build_help_and_bad_arguments(fakebin, tmp_path):
    log = tmp_path / "log"
    fake_docker(fakebin)
    result = run_script("build.sh", ["--help"], fakebin, log)
    assert result.returncode == 0 and "--flavour cuda" in result.stdout
    for args, message in ((["--flavour", "gpu"], "--flavour must be cuda, cuda-debian or cpu, not 'gpu'"),
                          (["--bogus"], "unknown argument '--bogus'"),
                          (["--tag"], "--tag needs a value"),
                          (["--dali-variant", "cu13"], "--dali-variant must look like cuda130"),
                          (["--pip-ca", str(tmp_path / "missing.crt")], "no such readable file")):
        result = run_script("build.sh", args, fakebin, log)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
    assert not any(" build " in line for line in recorded(log)), "a bad command line must not build"


def test_build_with_docker_passes_secret_and_args(fakebin, tmp_path):
    log = tmp_path / "log"
    fake_docker(fakebin)
    ca = tmp_path / "ca.crt"
    ca.write_text("certificate")
    result = run_script("build.sh", ["--pip-ca", str(ca), "--cuda-archs", "90", "--tag", "me/relabel:1"],
                        fakebin, log)
    assert result.returncode == 0, result.stderr
    build = next(line.split() for line in recorded(log) if line.startswith("docker build"))
    assert build[build.index("-f") + 1] == str(DOCKER / "Dockerfile")
    assert build[build.index("-t") + 1] == "me/relabel:1"
    assert build[build.index("--secret") + 1] == f"id=pip_ca,src={ca}"
    assert "CUDA_ARCHS=90" in build
    assert not any(word.startswith("BASE_IMAGE=") for word in build)  # the Dockerfile's CUDA default
    assert build[-1] == str(ROOT)
    assert "image size 2.50 GB" in result.stdout


def test_build_cpu_flavour_with_buildah_when_docker_has_no_daemon(fakebin, tmp_path):
    log = tmp_path / "log"
    fake_docker(fakebin, daemon=False)
    fake_buildah(fakebin)
    result = run_script("build.sh", ["--flavour", "cpu"], fakebin, log)
    assert result.returncode == 0, result.stderr
    bud = next(line.split() for line in recorded(log) if line.startswith("buildah bud"))
    assert bud[bud.index("--isolation") + 1] == "chroot" and bud[bud.index("--network") + 1] == "host"
    assert "BASE_IMAGE=relabel_dali-base:bookworm" in bud and bud[bud.index("-t") + 1] == "relabel_dali:cpu"
    assert "--secret" not in bud
    assert "image size 1.23 GB" in result.stdout


def test_build_without_any_tool(fakebin, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    for tool in ("bash", "sed", "dirname", "date", "awk", "head", "env"):
        (only / tool).symlink_to(shutil.which(tool))
    result = run_script("build.sh", [], fakebin, tmp_path / "log", path=str(only))
    assert result.returncode == 1
    assert "none of docker (with a running daemon), podman or buildah is installed" in result.stderr
    result = run_script("build.sh", ["--tool", "podman"], fakebin, tmp_path / "log", path=str(only))
    assert result.returncode == 1 and "CONTAINER_TOOL=podman is not installed" in result.stderr


# ---- smoke.sh ----

FAKE_RUN = f"""{RECORD}
[[ "$1" == info ]] && exit 0
[[ "$1" == from ]] && {{ echo fake-container; exit 0; }}
[[ "$1" == mount ]] && {{ echo "$FAKE_LAYER/merged"; exit 0; }}
[[ "$1" == run ]] || exit 0
host=""; args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  [[ "${{args[i]}}" == -v ]] && host=${{args[i+1]%%:*}}
done
case "$*" in
  *"-m pytest"*) exit ${{FAKE_PYTEST_RC:-0}} ;;
  *check_operator.py*) exit ${{FAKE_OPERATOR_RC:-0}} ;;
  *make_demo_data.py*) mkdir -p "$host/data" && echo {{}} > "$host/data/manifest.json" ;;
  *"pack_labels.py --help"*) echo "usage: pack_labels.py [-h]" ;;
  *relabel-train*) [[ -n "${{FAKE_NO_CHECKPOINT:-}}" ]] || {{ mkdir -p "$host/runs" && echo x > "$host/runs/checkpoint-last.pth"; }} ;;
esac
exit 0"""


def test_smoke_help_and_bad_arguments(fakebin, tmp_path):
    make_tool(fakebin, "docker", FAKE_RUN)
    log = tmp_path / "log"
    assert run_script("smoke.sh", ["--help"], fakebin, log).returncode == 0
    for args, message in ((["--user", "nobody"], "--user must be numeric UID:GID"),
                          (["--shm-size", "lots"], "--shm-size must look like 512m or 1g"),
                          (["--image"], "--image needs a value"),
                          (["extra"], "unknown argument 'extra'")):
        result = run_script("smoke.sh", args, fakebin, log)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not any(" run " in f" {line} " for line in recorded(log))


def test_smoke_passes_when_every_step_does(fakebin, tmp_path):
    make_tool(fakebin, "docker", FAKE_RUN)
    log, work = tmp_path / "log", tmp_path / "work"
    result = run_script("smoke.sh", ["--image", "img:1", "--workdir", str(work), "--keep"], fakebin, log)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASS  ") == 5 and "smoke.sh: PASS" in result.stdout
    runs = [line.split() for line in recorded(log) if line.startswith("docker run")]
    assert len(runs) == 6  # operator, pytest, data, pack, train, --help
    operator = next(words for words in runs if "docker/check_operator.py" in words)
    assert "--cuda" not in operator  # a CPU image passes without the CUDA backend
    for words in runs:
        assert words[words.index("--user") + 1] == "4242:4242"
        assert "--read-only" in words and words[words.index("--shm-size") + 1] == "1g"
        assert words[words.index("-v") + 1] == f"{work}:/smoke"
        assert "img:1" in words
    train = next(words for words in runs if "/usr/local/bin/relabel-train" in words)
    assert ["--optim.epochs", "1"] == train[train.index("--optim.epochs"):train.index("--optim.epochs") + 2]
    assert (work / "runs" / "checkpoint-last.pth").is_file()


@pytest.mark.parametrize("failure, step", [({"FAKE_PYTEST_RC": "3"}, "FAIL  pytest fast subset (exit 3"),
                                           ({"FAKE_OPERATOR_RC": "1"}, "FAIL  operator backends (exit 1"),
                                           ({"FAKE_NO_CHECKPOINT": "1"}, "FAIL  train 1 epoch")])
def test_smoke_fails_when_a_step_fails(fakebin, tmp_path, failure, step):
    make_tool(fakebin, "docker", FAKE_RUN)
    work = tmp_path / "work"
    result = run_script("smoke.sh", ["--workdir", str(work)], fakebin, tmp_path / "log", extra_env=failure)
    assert result.returncode == 1
    assert step in result.stdout and "smoke.sh: FAIL" in result.stdout
    assert not work.exists(), "the work folder is removed unless --keep"


# ---- SLURM batch script ----

def run_sbatch(fakebin, tmp_path, runtime, *extra):
    make_tool(fakebin, "srun", RECORD)
    make_tool(fakebin, "scontrol", 'printf "gpu017\\ngpu018\\n"')
    log = tmp_path / "log"
    env = {"SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "rn50",
           "SLURM_JOB_NUM_NODES": "2", "RUNS_DIR": str(tmp_path / "runs"), "RUNTIME": runtime}
    result = subprocess.run([BASH, str(DOCKER / "slurm_train.sbatch"), *extra], capture_output=True, text=True,
                            env={**os.environ, **env, "PATH": f"{fakebin}:{os.environ['PATH']}",
                                 "FAKE_LOG": str(log)}, timeout=60)
    return result, recorded(log)


def test_sbatch_pyxis(fakebin, tmp_path):
    result, calls = run_sbatch(fakebin, tmp_path, "pyxis", "--optim.epochs", "90")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    words = call.split()
    assert words[0] == "srun" and "--container-image=/shared/images/relabel_dali.sqsh" in words
    mounts = next(w for w in words if w.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert f"{tmp_path / 'runs'}:/runs" in mounts
    train = words[words.index("/usr/local/bin/relabel-train") + 1:]
    assert train[train.index("--resume") + 1] == "auto"
    assert train[train.index("--util.output_dir") + 1] == "/runs/rn50"
    assert train[-2:] == ["--optim.epochs", "90"]
    assert (tmp_path / "runs" / "rn50").is_dir()
    assert "rendezvous gpu017:29500" in result.stdout


def test_sbatch_docker(fakebin, tmp_path):
    result, calls = run_sbatch(fakebin, tmp_path, "docker")
    assert result.returncode == 0, result.stderr
    words = calls[0].split()
    assert words[:3] == ["srun", "--ntasks-per-node=1", "docker"]
    assert "--shm-size=64g" in words and "--network=host" in words
    assert "MASTER_ADDR" in words and "--resume" in words
    assert words[words.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"


def test_sbatch_rejects_unknown_runtime(fakebin, tmp_path):
    result, calls = run_sbatch(fakebin, tmp_path, "apptainer")
    assert result.returncode == 2 and "RUNTIME must be pyxis or docker" in result.stderr
    assert calls == []


# ---- entrypoint ----

def run_entrypoint(fakebin, tmp_path, env, *args):
    make_tool(fakebin, "torchrun", RECORD)
    make_tool(fakebin, "nvidia-smi", 'printf "GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n"')
    log = tmp_path / "log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                      "NPROC_PER_NODE", "RDZV_ID"))}
    result = subprocess.run([BASH, str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True,
                            env={**clean, **env, "RELABEL_DALI_HOME": str(tmp_path),
                                 "PATH": f"{fakebin}:{os.environ['PATH']}", "FAKE_LOG": str(log)}, timeout=60)
    return result, [line.split() for line in recorded(log)]


def test_entrypoint_one_node_uses_every_listed_gpu(fakebin, tmp_path):
    result, calls = run_entrypoint(fakebin, tmp_path, {}, "--optim.epochs", "1")
    assert result.returncode == 0, result.stderr
    assert calls == [["torchrun", "--standalone", "--local-addr=127.0.0.1", "--nproc_per_node=3", "train.py",
                     "--optim.epochs", "1"]]


def test_entrypoint_under_slurm(fakebin, tmp_path):
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "77", "MASTER_ADDR": "gpu017"}
    result, calls = run_entrypoint(fakebin, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert calls[0][:7] == ["torchrun", "--nnodes=2", "--nproc_per_node=3", "--node_rank=1", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=gpu017:29500", "--rdzv_id=77"]


def test_entrypoint_needs_master_addr_for_several_nodes(fakebin, tmp_path):
    result, calls = run_entrypoint(fakebin, tmp_path, {"NNODES": "2"})
    assert result.returncode != 0 and "MASTER_ADDR must name the rendezvous host" in result.stderr
    assert calls == []


def test_smoke_with_buildah_checks_the_container_layer(fakebin, tmp_path):
    make_tool(fakebin, "buildah", FAKE_RUN)
    layer = tmp_path / "layer"
    (layer / "diff" / "tmp" / "torchelastic").mkdir(parents=True)
    (layer / "diff" / "tmp" / "torchelastic" / "x").write_text("allowed")
    (layer / "diff" / "smoke").mkdir()  # a mount point: an empty folder
    env = {"FAKE_LAYER": str(layer), "CONTAINER_TOOL": "buildah"}
    log = tmp_path / "log"
    result = run_script("smoke.sh", ["--workdir", str(tmp_path / "w1")], fakebin, log, extra_env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  nothing written outside /tmp" in result.stdout and result.stdout.count("PASS  ") == 6
    runs = [line.split() for line in recorded(log) if line.startswith("buildah run")]
    assert runs and all(words[words.index("--user") + 1] == "4242:4242" and "fake-container" in words
                        for words in runs)
    assert any(line.startswith("buildah rm fake-container") for line in recorded(log))

    (layer / "diff" / "etc").mkdir()
    (layer / "diff" / "etc" / "written").write_text("not allowed")
    result = run_script("smoke.sh", ["--workdir", str(tmp_path / "w2")], fakebin, log, extra_env=env)
    assert result.returncode == 1
    assert "FAIL  nothing written outside /tmp" in result.stdout and "/etc/written" in result.stderr


# ---- the CUDA flavour on a plain base (CUDA_WHEELS=1) ----

def cuda_wheels_run() -> str:
    """The shell of the RUN that installs the registry's nvcc wheels (its secret mount dropped)."""
    (run,) = [rest for op, rest in dockerfile_instructions() if op == "RUN" and "CUDA_WHEELS" in rest
              and "cuda_wheels.py" in rest]
    return re.sub(r"^--mount=\S+\s+", "", run)


FAKE_PYTHON = f"""{RECORD}
if [[ "$1" == -c && "$2" == *"import torch"* ]]; then echo "torch==2.15.0+cu130"
elif [[ "$1" == tools/cuda_wheels.py ]]; then printf "%s" "$FAKE_WHEELS"
elif [[ "$1 $2 $3" == "-m pip install" ]]; then echo "constraint: $(cat "$PIP_CONSTRAINT")" >> "$FAKE_LOG"
fi"""


def run_cuda_wheels_step(fakebin, tmp_path, cuda_wheels: str, wheels: str):
    make_tool(fakebin, "python", FAKE_PYTHON)
    make_tool(fakebin, "nvcc", "exit 0")  # a base with a toolkit: the CPU flavour's crt step is skipped
    for tool in ("rm", "cat", "basename"):
        (fakebin / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "log"
    script = cuda_wheels_run().replace("/tmp/", f"{tmp_path}/")
    env = {"PATH": str(fakebin), "FAKE_LOG": str(log), "FAKE_WHEELS": wheels, "CUDA_WHEELS": cuda_wheels,
           "DALI_VARIANT": "cuda130"}
    result = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    return result, recorded(log)


def test_cuda_wheels_step_installs_what_cuda_wheels_py_names_with_torch_pinned(fakebin, tmp_path):
    wheels = "cuda-toolkit[nvcc,cccl]==13.0.2"
    result, calls = run_cuda_wheels_step(fakebin, tmp_path, "1", wheels)
    assert result.returncode == 0, result.stderr
    assert "python tools/cuda_wheels.py --dali-variant cuda130" in calls
    assert f"python -m pip install -q {wheels}" in calls
    assert "constraint: torch==2.15.0+cu130" in calls  # the wheels never replace the installed torch
    assert not (tmp_path / "torch-pin.txt").exists()


def test_cuda_wheels_step_fails_when_the_registry_has_no_nvcc(fakebin, tmp_path):
    result, calls = run_cuda_wheels_step(fakebin, tmp_path, "1", "")
    assert result.returncode != 0
    assert "CUDA_WHEELS=1: the registry has no nvcc for this torch" in result.stderr
    assert not any("pip install" in call for call in calls)


def test_cuda_wheels_step_is_off_by_default(fakebin, tmp_path):
    assert dockerfile_args()["CUDA_WHEELS"] == "0"
    result, calls = run_cuda_wheels_step(fakebin, tmp_path, "0", "nvidia-cuda-nvcc==13.0.*")
    assert result.returncode == 0, result.stderr
    assert calls == []  # nvcc on PATH: neither the wheels nor the crt headers


def test_cuda_wheels_make_the_build_require_the_cuda_backend():
    runs = [rest for op, rest in dockerfile_instructions() if op == "RUN"]
    check = next(run for run in runs if "check_cuda.py" in run)
    assert '$([ "${CUDA_WHEELS}" = 1 ] && echo --require-cuda)' in check
    build = next(run for run in runs if "load_operators()" in run)
    assert 'python docker/check_operator.py $([ "${CUDA_WHEELS}" = 1 ] && echo --cuda)' in build
    # the check comes before the cache is made readable: a failed check fails the build
    assert build.index("check_operator.py") < build.index("chmod -R a+rX")
    copies = " ".join(rest for op, rest in dockerfile_instructions() if op == "COPY")
    for script in ("docker/check_cuda.py", "docker/check_fatbin.py", "docker/check_operator.py",
                   "tools/cuda_wheels.py"):
        assert script in copies


def test_cuda_archs_reach_the_operator_build_as_sm_80_sm_90_and_ptx():
    from relabel_dali.ops import build as ops

    args = dockerfile_args()
    assert args["CUDA_ARCHS"] == "80;90"
    env = {}
    for op, rest in dockerfile_instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env["RELABEL_DALI_CUDA_ARCHS"] == "${CUDA_ARCHS}"  # the variable build.py reads
    flags = ops.nvcc_gencode(args["CUDA_ARCHS"].split(";"))
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def test_build_cuda_debian_flavour(fakebin, tmp_path):
    log = tmp_path / "log"
    fake_docker(fakebin, daemon=False)
    fake_buildah(fakebin)
    result = run_script("build.sh", ["--flavour", "cuda-debian", "--cuda-archs", "80;90;100"], fakebin, log)
    assert result.returncode == 0, result.stderr
    bud = next(line.split() for line in recorded(log) if line.startswith("buildah bud"))
    assert "BASE_IMAGE=relabel_dali-base:bookworm" in bud and "CUDA_WHEELS=1" in bud
    assert "CUDA_ARCHS=80;90;100" in bud and bud[bud.index("-t") + 1] == "relabel_dali:cuda-debian"
    for flavour in ("cuda", "cpu"):  # only this flavour takes nvcc from the registry
        run_script("build.sh", ["--flavour", flavour], fakebin, log)
    assert sum("CUDA_WHEELS=1" in line for line in recorded(log) if line.startswith("buildah bud")) == 1


def test_smoke_cuda_asks_for_the_cuda_backend(fakebin, tmp_path):
    make_tool(fakebin, "docker", FAKE_RUN)
    log = tmp_path / "log"
    result = run_script("smoke.sh", ["--cuda", "--image", "relabel_dali:cuda-debian"], fakebin, log)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  operator backends (CPU and CUDA)" in result.stdout
    operator = next(line.split() for line in recorded(log) if "check_operator.py" in line)
    assert operator[-2:] == ["docker/check_operator.py", "--cuda"]


# ---- check_fatbin.py (a synthetic library: no nvcc needed) ----

def load_docker_script(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fatbin(entries: list[tuple[int, int]]) -> bytes:
    """One fat binary as nvcc lays it out: header, then (kind, arch) entries with 8-byte payloads."""
    body = b""
    for kind, arch in entries:
        header = struct.pack("<HHIQIIHHI", kind, 0x0101, 64, 8, 0, 0, 0, 0, arch).ljust(64, b"\0")
        body += header + b"payload!"
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def elf_with_sections(sections: dict[str, bytes]) -> bytes:
    """A minimal 64-bit little-endian ELF file holding ``sections`` (and its name table)."""
    names = b"\0" + b"".join(name.encode() + b"\0" for name in [".shstrtab", *sections])
    blobs = [names, *sections.values()]
    data = bytearray(64)
    offsets = []
    for blob in blobs:
        offsets.append(len(data))
        data += blob + b"\0" * (-len(blob) % 8)
    shoff = len(data)
    data += b"\0" * 64  # the null section
    name_at = 1
    for name, blob, offset in zip([".shstrtab", *sections], blobs, offsets):
        data += struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset, len(blob), 0, 0, 8, 0)
        name_at += len(name) + 1
    data[:64] = (b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64,
                                                                   0, 0, 64, len(blobs) + 1, 1))
    return bytes(data)


class TestCheckFatbin:
    def write(self, tmp_path, sections) -> Path:
        library = tmp_path / "library.so"
        library.write_bytes(elf_with_sections(sections))
        return library

    def test_lists_sass_and_ptx_of_every_fat_binary(self, tmp_path):
        check = load_docker_script("check_fatbin")
        # two objects' fat binaries, the second after alignment padding, as in a linked library
        section = fatbin([(2, 80), (2, 90), (1, 90)]) + b"\0" * 8 + fatbin([(2, 80), (2, 90), (1, 90)])
        assert check.fatbin_entries(section) == [("SASS", 80), ("SASS", 90), ("PTX", 90)] * 2
        library = self.write(tmp_path, {".text": b"code", ".nv_fatbin": section})
        assert check.elf_section(library.read_bytes(), ".nv_fatbin") == section
        result = subprocess.run([sys.executable, str(DOCKER / "check_fatbin.py"), str(library), "--archs", "80;90"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "6 device code entries: sm_80 SASS, compute_90 PTX, sm_90 SASS" in result.stdout

    @pytest.mark.parametrize("entries, lacking", [
        ([(2, 80), (2, 90)], ["PTX compute_90"]),
        ([(2, 90), (1, 90)], ["SASS sm_80"]),
        ([(2, 80), (2, 90), (1, 80)], ["PTX compute_90"]),  # PTX must be the newest arch's
        ([(2, 75)], ["SASS sm_80", "SASS sm_90", "PTX compute_90"]),
    ])
    def test_missing_entries(self, entries, lacking):
        check = load_docker_script("check_fatbin")
        assert check.missing(check.fatbin_entries(fatbin(entries)), [80, 90]) == lacking

    def test_a_library_without_device_code_fails_the_arch_check(self, tmp_path):
        library = self.write(tmp_path, {".text": b"code"})
        script = [sys.executable, str(DOCKER / "check_fatbin.py"), str(library)]
        listed = subprocess.run(script, capture_output=True, text=True)
        assert listed.returncode == 0 and "0 device code entries: none (no CUDA code)" in listed.stdout
        checked = subprocess.run([*script, "--archs", "80;90"], capture_output=True, text=True)
        assert checked.returncode == 1
        assert "lacks SASS sm_80, SASS sm_90, PTX compute_90" in checked.stderr

    @pytest.mark.parametrize("args, code, message", [(["--archs", "sm_90"], 2, "expected compute capabilities"),
                                                     ([], 2, "not a 64-bit little-endian ELF file")])
    def test_bad_input(self, tmp_path, args, code, message):
        text = tmp_path / "notes.txt"
        text.write_text("not a library")
        result = subprocess.run([sys.executable, str(DOCKER / "check_fatbin.py"), str(text), *args],
                                capture_output=True, text=True)
        assert result.returncode == code and message in result.stderr
