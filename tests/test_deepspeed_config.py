"""--offload rendered into the DeepSpeed config (the same file as every stage), and what DeepSpeed would refuse at
start-up refused here first."""

from __future__ import annotations

import pytest

from job.core.config import RunConfig
from job.core.errors import JobError
from job.run.deepspeed_config import check_optimizer_blocks, deepspeed_config, offload_in_use


def test_offload_optimizer_and_all_render_the_offload_sections_and_deepspeeds_optimizer(tmp_path):
    assert offload_in_use(deepspeed_config(RunConfig.load())) == "none"
    ds = deepspeed_config(RunConfig.load(offload="optimizer"))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero and offload_in_use(ds) == "optimizer"
    assert ds["optimizer"]["type"] == "AdamW" and set(ds["optimizer"]["params"].values()) == {"auto"}
    check_optimizer_blocks(RunConfig.load(offload="optimizer"))  # "auto" values: the run config decides
    ds = deepspeed_config(RunConfig.load(zero_stage=3, offload="all", offload_nvme=str(tmp_path)))
    zero = ds["zero_optimization"]
    assert (
        zero["offload_param"]
        == zero["offload_optimizer"]
        == {
            "device": "nvme",
            "nvme_path": str(tmp_path),
            "pin_memory": True,
        }
    )
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the export still gathers whole weights
    assert offload_in_use(ds) == "all"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"offload": "all"}, "offloading parameters .--offload all. needs ZeRO-3; this run has ZeRO-2"),
        ({"offload": "optimizer", "offload_nvme": "/nvme"}, "offloading NVMe .--offload-nvme. needs ZeRO-3"),
        ({"offload": "optimizer", "zero_stage": 0}, "needs ZeRO stage 1, 2 or 3; this run has 0"),
    ],
)
def test_offload_deepspeed_would_refuse_is_refused_before_any_process(values, message):
    with pytest.raises(JobError, match=message):
        deepspeed_config(RunConfig.load(**values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"offload": "optimizer", "deepspeed": "none"}, "--offload optimizer needs DeepSpeed ZeRO"),
        ({"offload_nvme": "/nvme"}, "--offload-nvme names where offloaded states go, but --offload is none"),
        ({"offload": "disk"}, "--offload 'disk' is not one of none, optimizer, all"),
    ],
)
def test_offload_settings_that_cannot_work_are_refused_as_bad_input(values, message):
    with pytest.raises(JobError, match=message):
        RunConfig.load(**values)
