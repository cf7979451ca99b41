"""The locked dependency sets agree with pyproject.toml, and CI, the README and the Dockerfile install them."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.lock import COMMAND, DEV_LOCK, NEVER_IMPORTED, PROJECT, SERVER_LOCK, TORCH, Locked, pyproject, read_lock

ROOT = Path(__file__).resolve().parent.parent
RELOCK = f"run `{COMMAND}` and commit {SERVER_LOCK.name} and {DEV_LOCK.name}"


def disagreements(lock: dict[str, Locked], requirements: list[Requirement]) -> list[str]:
    """Each requirement of pyproject.toml the lock lacks or holds at a version outside it, and each package the lock
    still says pyproject.toml asks for when it no longer does."""
    wanted = {canonicalize_name(r.name): r for r in requirements if r.name != TORCH}
    out = [
        f"{r} is not in the lock" if name not in lock else f"{r}, locked at {lock[name].version}"
        for name, r in wanted.items()
        if name not in lock or not r.specifier.contains(lock[name].version, prereleases=True)
    ]
    out += [
        f"{name}=={locked.version} is no longer in pyproject.toml"
        for name, locked in lock.items()
        if PROJECT in locked.via and name not in wanted
    ]
    return out


def test_the_server_lock_holds_pyproject_dependencies_at_their_pins() -> None:
    problems = disagreements(read_lock(SERVER_LOCK), pyproject()[""])
    assert not problems, f"{SERVER_LOCK.name} and pyproject.toml disagree: {problems}; {RELOCK}"


def test_the_dev_lock_holds_every_requirement_and_extra_at_its_pin() -> None:
    every = [r for reqs in pyproject().values() for r in reqs]
    problems = disagreements(read_lock(DEV_LOCK), every)
    assert not problems, f"{DEV_LOCK.name} and pyproject.toml disagree: {problems}; {RELOCK}"


def test_the_server_lock_is_the_dev_locks_versions() -> None:
    server, dev = read_lock(SERVER_LOCK), read_lock(DEV_LOCK)
    differ = {
        n: (s.version, dev[n].version if n in dev else None)
        for n, s in server.items()
        if n not in dev or dev[n].version != s.version
    }
    assert not differ, f"CI would test other versions than the image runs: {differ}; {RELOCK}"


def test_torch_is_pinned_in_pyproject_and_left_to_its_own_install_command() -> None:
    (torch,) = [r for r in pyproject()[""] if r.name == TORCH]
    assert str(torch.specifier) == "==2.13.0", "torch stays at 2.13.0 (the CPU wheel here, CUDA in the GPU image)"
    for lock in (SERVER_LOCK, DEV_LOCK):
        assert TORCH not in read_lock(lock), f"{lock.name} must not pin torch (its index picks CPU or CUDA)"


def test_the_server_lock_leaves_out_what_the_server_never_imports() -> None:
    direct = {canonicalize_name(r.name) for r in pyproject()[""]}
    kept = set(read_lock(SERVER_LOCK)) & (set(NEVER_IMPORTED) - direct)
    assert not kept, f"{kept} in {SERVER_LOCK.name}; {RELOCK}"


# --- who installs the lock -----------------------------------------------------------------------


def commands(text: str) -> list[str]:
    """Shell command lines, comments and blank lines dropped, trailing comments cut."""
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_block(after: str) -> list[str]:
    """The commands of the first ```sh block in the README after the line `after`."""
    text = (ROOT / "README.md").read_text()
    rest = text[text.index(after) :]
    return commands(re.search(r"```sh\n(.*?)```", rest, re.S).group(1))  # type: ignore[union-attr]


def test_ci_runs_exactly_the_readmes_develop_install_and_tests() -> None:
    ci = [c for c in commands((ROOT / ".ci" / "run").read_text()) if not c.startswith(("set ", "cd "))]
    develop = readme_block("### Develop")
    assert ci[: len(develop)] == develop
    assert f"pip install --no-deps -r {DEV_LOCK.name}" in develop
    assert ci[len(develop) :] == readme_block("## Test")


def test_the_readmes_server_install_is_the_lock_without_test_tools() -> None:
    run = readme_block("### Run the server")
    assert run.index("pip install torch==2.13.0") < run.index(f"pip install --no-deps -r {SERVER_LOCK.name}")
    assert run[-1] == "pip install --no-deps ."


def test_the_image_installs_the_lock_then_the_code() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lock = text.index(f"RUN pip install --no-deps -r /tmp/{SERVER_LOCK.name}")
    assert text.index(f"COPY {SERVER_LOCK.name} ") < lock < text.index("COPY . .")
    assert text.index("pip install --index-url") < lock  # torch first, from the index that picks CPU or CUDA
    assert "RUN pip install --no-deps --target /opt/app /src" in text  # the code, apart from the venv
    final = text[text.rindex("FROM ") :]
    # The final stage ships the two as separate layers: a code change leaves the dependencies' layer as it was.
    assert final.index("COPY --from=build /opt/venv /opt/venv") < final.index("COPY --from=build /opt/app /opt/app")
    assert "PYTHONPATH=/opt/app" in final
