"""The package as a user installs it: a wheel built from the checkout holds every subpackage, and
`singlepass --help` works from a non-editable install in a fresh virtual environment.

The fresh environment gets the wheel itself (non-editable, no checkout on its path) and sees the
third-party dependencies of this test's own environment through a path file (installing them
from the registry on every run would cost a minute); the editable install of the checkout is
not visible there (its finder lives in a .pth file, which a path entry does not run)."""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "artifacts",
    "build",
    "runs",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "tests",
    "*.onnx",
    "*.onnx.data",
    "*.safetensors",
    "*.png",
    "*.json",
)


def subpackages() -> set[str]:
    """Every folder of the checkout that is a Python package, as a dotted name under singlepass."""
    out = {"singlepass"}
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and rel.parts[0] in (".venv", "tests", "build", "artifacts", "runs"):
            continue
        out.add(".".join(("singlepass", *rel.parts)) if rel.parts else "singlepass")
    return out


def test_wheel_has_every_subpackage_and_the_cli_runs_from_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    shutil.copy2(REPO / "README.md", src / "README.md")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("singlepass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert subpackages() <= packaged, f"missing from the wheel: {sorted(subpackages() - packaged)}"
    assert not [n for n in names if n.startswith("singlepass/tests/") or n.endswith((".onnx", ".safetensors"))]

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (Path(site) / "outer-deps.pth").write_text(deps + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    run = subprocess.run([str(env / "bin" / "singlepass"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for command in ("extract", "train", "eval", "export", "validate", "generate", "bench", "demo"):
        assert command in run.stdout
    where = subprocess.run(
        [str(py), "-c", "import singlepass, sys; print(singlepass.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert str(env) in where  # the installed copy, not the checkout
