"""Native-core behaviours with Linux that issue H lists as failing today.

Marked ``nested_kvm_todo``: out of the default run (each says so when skipped); run them with
``SUPERMACHINE_NESTED_TODO=1 .venv/bin/python -m pytest tests/nested -v`` (or
``-m nested_kvm_todo``). Each one should pass once issue H item 2 is done; then move it into
``test_native_linux.py`` (marker ``nested_kvm``).
"""

from __future__ import annotations

import pytest

from supermachine_jupyter import VmConfig

pytestmark = pytest.mark.nested_kvm_todo

NATIVE = VmConfig(engine="native")


# -- (2) vCPUs ---------------------------------------------------------------------------

@pytest.mark.parametrize("vcpus", [2])     # L1 has 2 CPUs; VmConfig caps vcpus at the host's
def test_guest_sees_its_vcpus(image, vcpus):
    with image.start(NATIVE.with_vcpus(vcpus), name=f"nested-cpus{vcpus}") as vm:
        assert vm.vcpus == vcpus
        assert vm.run("nproc").stdout == f"{vcpus}\n", vm.console_output()[-2000:]


# -- (8) calibration -----------------------------------------------------------------------

def test_calibration_gives_the_same_verdict_every_run(l1_kvm):
    from supermachine_jupyter.engines.accel import kvm_status
    verdicts = [kvm_status(refresh=True) for _ in range(5)]
    print("\n".join(v.summary() for v in verdicts))
    assert {v.speed for v in verdicts} == {"hardware"}, [v.summary() for v in verdicts]
