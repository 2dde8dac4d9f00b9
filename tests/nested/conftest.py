"""The nested-KVM tier: tests marked ``nested_kvm`` run inside an L1 Linux whose /dev/kvm works.

This host's /dev/kvm cannot boot Linux; an L1 Linux under QEMU TCG with an emulated AMD SVM
CPU can (``tools/nested_kvm.py``, DESIGN.md). So, in the host's pytest run:

* every collected test marked ``nested_kvm`` (or ``nested_kvm_todo``) is replaced by a stand-in
  item with the same node id, markers and keywords (``-k``/``-m`` select as usual);
* the first stand-in to run boots L1 for the whole session: it builds (or finds) the
  cached L1, makes sure the guest assets and the native core are built on the host (the host
  root is read-only in L1), and runs one inner ``pytest`` over the selected node ids in
  the host's own root and venv, chrooted inside L1 — once per L1 size: L1 has one CPU, and
  the few tests marked ``l1_cpus(n)`` (an n-vCPU guest: VmConfig caps vcpus at the host's
  CPUs) run in a short L1 boot with n. With two CPUs, L1 itself crashed or hung in most runs of
  the whole tier, with one it only hangs now and then (``tools/nested_kvm.py``, ``L1_VCPUS``),
  so as little as possible runs with more;
* each stand-in then passes, fails or skips as its inner test did, with the inner report and
  output. If L1 cannot be built or booted, each stand-in fails saying why. If L1 itself
  crashes or hangs (its kvm_amd under emulated SVM has been seen to panic), the tests it did not
  finish run again in another L1 boot, up to ``L1_BOOTS`` in all. If every boot ends that way,
  the tests still without a result are reported skipped as NOT RUN, naming L1 and its crash
  lines (L1 is the tier's machinery, not the code under test); a test that hangs or fails
  inside L1 always fails.

Inside L1 (``SUPERMACHINE_NESTED_L1=1``) the marked tests run for real and each report is
appended to ``$SUPERMACHINE_NESTED_RESULTS/reports.jsonl`` as it happens (it survives an L1
crash; the junit xml is written only at the end).

Environment: ``SUPERMACHINE_NESTED=off`` skips the tier (each test says so);
``SUPERMACHINE_NESTED=direct`` runs the marked tests on this host as they are (a machine whose
KVM runs Linux); ``SUPERMACHINE_NESTED_TODO=1`` (or ``-m nested_kvm_todo``) adds tests marked
``nested_kvm_todo`` (known failures, kept out of the default run; none today);
``SUPERMACHINE_NESTED_TIMEOUT`` bounds one L1 boot (seconds, default 1500). A test that hangs
inside L1 is ended by pytest-timeout (thread method: it ends the inner pytest, after a stack
dump of every thread); it fails with that dump and the tests it kept from running get the
next boot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_L1 = os.environ.get("SUPERMACHINE_NESTED_L1") == "1"
MODE = os.environ.get("SUPERMACHINE_NESTED", "l1").strip().lower()
MARKERS = ("nested_kvm", "nested_kvm_todo")
L1_TIMEOUT_S = float(os.environ.get("SUPERMACHINE_NESTED_TIMEOUT", "1500"))
#: L1 boots for one session's tests: L1's kvm_amd under QEMU's emulated SVM has crashed or hung
#: in about one run in ten, at different tests each time; the tests it did not finish run in
#: the next boot, and a test still without a result after the last one fails naming L1.
L1_BOOTS = 3
#: Per inner test (pytest-timeout inside L1, where everything runs at TCG speed; a VM boots in
#: 10-30 s there). Its thread method ends the inner pytest when a test hangs in C code, where a
#: signal cannot reach Python; faulthandler dumps every thread's stack shortly before.
INNER_TEST_TIMEOUT_S = 240
ABOUT = ("runs inside the nested-KVM L1 Linux (tools/nested_kvm.py; this host's /dev/kvm "
         "cannot boot Linux)")


def _load_tool():
    name = "nested_kvm"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "nested_kvm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _marked(item) -> str | None:
    for name in MARKERS:
        if item.get_closest_marker(name) is not None:
            return name
    return None


def _l1_cpus(item) -> int:
    """The CPUs the L1 running ``item`` needs: ``@pytest.mark.l1_cpus(n)``, else one."""
    marker = item.get_closest_marker("l1_cpus")
    return int(marker.args[0]) if marker is not None else 1


def _todo_enabled(config) -> bool:
    if os.environ.get("SUPERMACHINE_NESTED_TODO", "").strip().lower() in ("1", "yes", "true"):
        return True
    expr = config.getoption("markexpr", "") or ""
    return re.search(r"(?<!not )\bnested_kvm_todo\b", expr) is not None


# =============================================================================================
# Inside L1: run for real, report each phase as it ends
# =============================================================================================

def _report_line(report) -> dict:
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration": round(report.duration, 3), "sections": report.sections[-6:]}
    if report.skipped and isinstance(report.longrepr, tuple):
        line["skip_reason"] = report.longrepr[2]
    elif report.longrepr is not None:
        line["longrepr"] = str(report.longrepr)[-20000:]
    if hasattr(report, "wasxfail"):
        line["wasxfail"] = report.wasxfail
    return line


def _append_result(record: dict) -> None:
    results = os.environ.get("SUPERMACHINE_NESTED_RESULTS")
    if not results:
        return
    with open(Path(results) / "reports.jsonl", "a") as out:
        out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())


if IN_L1:
    def pytest_runtest_logstart(nodeid, location):
        _append_result({"nodeid": nodeid, "when": "start", "at": time.time()})

    def pytest_runtest_logreport(report):
        _append_result(_report_line(report))


# =============================================================================================
# On the host: one L1 boot runs every selected marked test; stand-ins report their outcomes
# =============================================================================================

class NestedOutcome(Exception):
    """A stand-in's failure: the inner test's report, or why L1 could not run it."""


class L1Tier:
    """Runs the selected node ids in L1 (once per session, on first use)."""

    def __init__(self, config):
        self.config = config
        self.nodeids: list[str] = []
        self.groups: dict[int, list[str]] = {}     # L1 CPUs → the node ids run with that many
        self.results: dict[str, list[dict]] | None = None
        self.started: dict[str, tuple[int, int]] = {}  # node id → (L1 CPUs, boot) it started in
        self.error: str | None = None
        self.final_errors: dict[str, str] = {}     # node id → why it has no result
        self.not_run: dict[str, str] = {}          # node id → why L1 never ran it
        self.timings: list[str] = []
        self.runs: list = []
        self.tier_seconds = 0.0

    # -- the one L1 session ------------------------------------------------------------
    def ensure_ran(self) -> None:
        if self.results is not None:
            return
        self.results = {}
        started = time.monotonic()
        try:
            self._run()
        except NestedOutcome as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - every stand-in reports it
            self.error = f"the nested tier failed on the host: {type(exc).__name__}: {exc}"
        finally:
            self.tier_seconds = time.monotonic() - started
            self.timings.append(f"tier total: {self.tier_seconds:.1f} s")

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[nested] {line}")

    def _run(self) -> None:
        tool = _load_tool()
        t0 = time.monotonic()
        try:
            assets = tool.ensure_l1(self._say)
        except tool.L1Error as exc:
            raise NestedOutcome(f"the L1 Linux cannot be built here: {exc}") from exc
        self.timings.append(f"L1 {'build' if assets.built_now else 'cache look-up'}: "
                            f"{time.monotonic() - t0:.1f} s ({assets.package} {assets.version}, "
                            f"kernel {assets.kernel_release})")
        t0 = time.monotonic()
        self._host_prerequisites()
        self.timings.append(f"host prerequisites (guest assets, native core): "
                            f"{time.monotonic() - t0:.1f} s")
        base = _new_run_dir()
        for cpus, nodeids in sorted(self.groups.items()):
            self._run_group(tool, assets, base, cpus, nodeids)

    def _run_group(self, tool, assets, base: Path, cpus: int, nodeids: list[str]) -> None:
        """Run ``nodeids`` in L1 booted with ``cpus`` CPUs, booting it again (up to
        ``L1_BOOTS`` in all) for the tests an L1 crash or hang left without a result."""
        remaining = list(nodeids)
        problems: list[str] = []
        for attempt in range(1, L1_BOOTS + 1):
            results = base / f"cpus{cpus}-boot{attempt}"
            results.mkdir()
            self._write_run_script(tool, results, remaining, attempt)
            self._say(f"booting L1 ({cpus} CPU, attempt {attempt}) for {len(remaining)} tests; "
                      f"console: {results / 'console.log'}")
            run = tool.run_l1(assets, results, timeout=L1_TIMEOUT_S, vcpus=cpus)
            self.runs.append(run)
            boot = f"{run.boot_seconds:.1f} s" if run.boot_seconds is not None else "n/a"
            inner = f"{run.command_seconds:.1f} s" if run.command_seconds is not None else "n/a"
            self.timings.append(f"L1 ({cpus} CPU) boot {attempt}: QEMU start → command {boot}, "
                                f"inner pytest {inner}, wall {run.wall_seconds:.1f} s, status "
                                f"{run.status}, kvm ready {run.kvm_ready} ({results})")
            self._collect(results / "reports.jsonl", (cpus, attempt))
            if run.boot_seconds is not None and not run.kvm_ready:
                raise NestedOutcome(f"L1 booted but has no usable KVM: {run.info} "
                                    f"(console: {run.console_log})")
            remaining = [n for n in remaining if not self._finished(n)]
            if not remaining:
                return
            if run.crash is not None:
                # L1 itself crashed: what it did not finish runs in the next boot.
                problems.append(f"boot {attempt}: {run.crash}")
                self.timings.append(f"L1 ({cpus} CPU) boot {attempt} crashed: {run.crash}")
                self._say(f"L1 crashed ({run.crash}); {len(remaining)} tests left"
                          + ("; booting it again" if attempt < L1_BOOTS else ""))
                continue
            died_in = [n for n in remaining if self.started.get(n) == (cpus, attempt)]
            if not died_in:
                why = (f"the inner pytest in L1 ended with status {run.status} before running "
                       f"this test; its output:\n{_tail(results / 'output.log', 60)}")
                self.final_errors.update((n, why) for n in remaining)
                return
            # The inner pytest died inside a test (pytest-timeout's thread method ends the
            # process when a test hangs in C code, after dumping every thread's stack): that
            # test fails with the dump; the tests it did not reach run in the next boot.
            for nodeid in died_in:
                self.final_errors[nodeid] = (
                    f"the inner pytest died in this test (status {run.status}: a hang past "
                    f"{INNER_TEST_TIMEOUT_S} s ends it with every thread's stack); output:\n"
                    f"{_tail(results / 'output.log', 120)}")
            remaining = [n for n in remaining if n not in died_in]
            problems.append(f"boot {attempt}: the inner pytest died in {', '.join(died_in)}")
            self.timings.append(problems[-1])
            if not remaining:
                return
        # Every boot ended with L1 itself crashing or hanging: the tests left are not run, and
        # say so (the tier's infrastructure failed, not the code under test).
        l1_down = len(problems) == L1_BOOTS and all(p.split(": ", 1)[1].startswith("L1 ")
                                                    for p in problems)
        why = (f"no result, after {L1_BOOTS} L1 boots with {cpus} CPU: " + "; ".join(problems)
               + f"\n--- L1 console (last lines) ---\n{self.runs[-1].console_tail(40)}")
        for nodeid in remaining:
            (self.not_run if l1_down else self.final_errors)[nodeid] = why

    def _host_prerequisites(self) -> None:
        """Build on the host what L1 cannot (its view of the host root is read-only): the
        native core when its sources are newer (as tests/native does), the guest assets."""
        from supermachine_jupyter import Image
        from tests.native.conftest import ensure_built
        ensure_built()
        Image.default(self._say)

    def _write_run_script(self, tool, results: Path, nodeids: list[str], attempt: int) -> None:
        env = tool.default_env()
        env.update(PYTHONUNBUFFERED="1",
                   SUPERMACHINE_NESTED_ATTEMPT=str(attempt),
                   # Only the plugins the tier uses: autoloading every installed one
                   # (hypothesis, anyio, ...) costs ~13 s of L1's TCG time per boot.
                   PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        if _todo_enabled(self.config):
            env["SUPERMACHINE_NESTED_TODO"] = "1"
        prelude = "\n".join([
            # Jupyter's folders exist before any test, so the first VM that writes its registry
            # entry leaves nothing new in /tmp (the teardown tests compare /tmp before/after).
            f"mkdir -p {env['JUPYTER_RUNTIME_DIR']} {env['IPYTHONDIR']} {env['JUPYTER_DATA_DIR']}",
            # The guest kernel and initramfs built on the host, seen through the read-only share.
            tool.guest_assets_prelude(env, self._say)])
        argv = [sys.executable, "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider",
                "-v", "-rA",
                f"--timeout={INNER_TEST_TIMEOUT_S}", "--timeout-method=thread",
                "-o", f"faulthandler_timeout={INNER_TEST_TIMEOUT_S - 30}", "--durations=0",
                f"--junitxml={tool.RESULTS_IN_L1}/junit.xml", "-o", "junit_logging=all",
                *nodeids]
        tool.write_run_script(results, argv, cwd=str(self.config.rootpath), env=env,
                              prelude=prelude)

    def _collect(self, jsonl: Path, attempt: tuple[int, int]) -> None:
        try:
            lines = jsonl.read_text().splitlines()
        except OSError:
            return
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue        # a line cut by a crash
            if record["when"] == "start":
                self.started[record["nodeid"]] = attempt
                self.results[record["nodeid"]] = []      # a retry replaces a cut-short run
            else:
                self.results.setdefault(record["nodeid"], []).append(record)

    def _finished(self, nodeid: str) -> bool:
        return any(r["when"] == "teardown" for r in self.results.get(nodeid, []))

    # -- one stand-in ------------------------------------------------------------------
    def outcome(self, item) -> None:
        self.ensure_ran()
        nodeid = item.original_nodeid
        records = self.results.get(nodeid, [])
        for record in records:
            for title, text in record.get("sections", []):
                # "Captured stdout call" → "Captured stdout (inside L1) call"
                words = title.split()
                if len(words) == 3 and words[0] == "Captured":
                    item.add_report_section(words[2], f"{words[1]} (inside L1)", text)
                else:
                    item.add_report_section("call", f"{title} (inside L1)", text)
        if not self._finished(nodeid):
            why = self.final_errors.get(nodeid) or self.not_run.get(nodeid) or self.error \
                or "L1 ran but reported nothing for this test"
            if nodeid in self.started:
                cpus, boot = self.started[nodeid]
                why = f"it started in L1 ({cpus} CPU) boot {boot} but did not finish: {why}"
            if nodeid in self.not_run:
                pytest.skip(f"[nested] NOT RUN: L1 itself (kvm_amd under QEMU's emulated SVM) "
                            f"crashed or hung in each of its {L1_BOOTS} boots; run "
                            f"`make test-nested` again. {why}")
            raise NestedOutcome(f"[nested] {nodeid}: {why}")
        item.inner_seconds = sum(r["duration"] for r in records)
        for record in records:
            if record["outcome"] == "failed":
                raise NestedOutcome(f"[inside L1, {record['when']}] {record.get('longrepr', '')}")
        for record in records:
            if record["outcome"] == "skipped":
                reason = record.get("skip_reason", "").removeprefix("Skipped: ")
                # reported at the test's own location, as a skip in the test itself would be
                raise pytest.skip.Exception(f"[inside L1] {reason}", _use_item_location=True)


class NestedItem(pytest.Item):
    """Stands in on the host for a marked test; its outcome is the inner test's."""

    def __init__(self, *, original, tier: L1Tier, **kwargs):
        super().__init__(**kwargs)
        self.original_nodeid = original.nodeid
        self._original = original
        self.tier = tier
        self.inner_seconds = None
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)
        # pytest-timeout: the first stand-in waits for the whole L1 session.
        self.add_marker(pytest.mark.timeout(2 * L1_TIMEOUT_S + 600))

    def runtest(self):
        self.tier.outcome(self)

    def reportinfo(self):
        return self._original.reportinfo()

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, NestedOutcome):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


_TIER_KEY = pytest.StashKey[L1Tier]()


@pytest.hookimpl(trylast=True)     # after -k/-m deselection
def pytest_collection_modifyitems(session, config, items):
    if IN_L1 or MODE == "direct":
        return
    tier = L1Tier(config)
    config.stash[_TIER_KEY] = tier
    todo = _todo_enabled(config)
    for index, item in enumerate(items):
        marker = _marked(item)
        if marker is None or isinstance(item, NestedItem):
            continue
        if MODE == "off":
            item.add_marker(pytest.mark.skip(
                reason=f"{ABOUT}; SUPERMACHINE_NESTED=off turned the tier off "
                       "(unset it, or `make test-nested`, to run it)"))
            continue
        if marker == "nested_kvm_todo" and not todo:
            item.add_marker(pytest.mark.skip(
                reason=f"known to fail today (issue H); {ABOUT}: run with "
                       "SUPERMACHINE_NESTED_TODO=1 or -m nested_kvm_todo"))
            continue
        items[index] = NestedItem.from_parent(item.parent, name=item.name, original=item,
                                              tier=tier)
        tier.nodeids.append(item.nodeid)
        tier.groups.setdefault(_l1_cpus(item), []).append(item.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tier = config.stash.get(_TIER_KEY, None)
    if tier is None or tier.results is None:
        return
    terminalreporter.section("nested-KVM tier (L1) timings")
    for line in tier.timings:
        terminalreporter.write_line(line)
    for nodeid in tier.nodeids:
        records = tier.results.get(nodeid, [])
        outcome = next((r["outcome"] for r in records if r["outcome"] != "passed"), "passed") \
            if tier._finished(nodeid) else "no result"
        seconds = sum(r["duration"] for r in records)
        terminalreporter.write_line(f"{seconds:7.1f} s  {outcome:8s} {nodeid}")


#: The last runs' results (console logs, junit xml) are kept here, older ones removed.
RUNS_DIR = Path(tempfile.gettempdir()) / "supermachine-nested"
RUNS_KEPT = 5


def _new_run_dir() -> Path:
    import shutil
    RUNS_DIR.mkdir(exist_ok=True)
    for old in sorted(RUNS_DIR.glob("run-*"), key=lambda p: p.stat().st_mtime)[:-RUNS_KEPT + 1]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-",
                                 dir=RUNS_DIR))


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


# =============================================================================================
# Fixtures for the tests that run inside L1
# =============================================================================================

@pytest.fixture(scope="session")
def l1_kvm():
    """The KVM of L1 (or of a machine whose KVM runs Linux: SUPERMACHINE_NESTED=direct)."""
    assert Path("/dev/kvm").exists(), "no /dev/kvm: this test needs a KVM that runs Linux"
    if IN_L1:
        flags = Path("/proc/cpuinfo").read_text()
        assert re.search(r"\bsvm\b", flags) and re.search(r"\bnpt\b", flags), \
            "L1 shows no svm/npt: kvm_amd cannot run guests with nested paging"
    return Path("/dev/kvm")


@pytest.fixture(scope="session")
def image(l1_kvm):
    from supermachine_jupyter import Image
    return Image.default()
