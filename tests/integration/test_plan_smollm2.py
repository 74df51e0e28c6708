"""adaptlab plan on the real smollm2-135m: architecture read from its config, counts pinned (DATA.md)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_smollm2_counts_from_the_real_config():
    from adaptlab.plan.arch import load_arch, targets_for
    from adaptlab.plan.estimate import Arm, trainable_params

    arch = load_arch("smollm2-135m")
    names = tuple(targets_for(arch, "all-linear"))
    assert arch.total_params == 134_515_008
    assert trainable_params(arch, Arm("lora", 8, names)) == 2_442_240
    assert trainable_params(arch, Arm("lora", 8, tuple(targets_for(arch, "q_proj,v_proj")))) == 460_800
