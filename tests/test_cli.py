"""The sweep's validation composes each distinct choice of config groups once: the same configs as Hydra's
compose of every job."""

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from quanteval import cli


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def _jobs():
    grid = itertools.product(["method=none", "method=gptq", "method=awq"], ["bits=8", "bits=3"],
                             ["task=wikitext2", "task=ifeval", "task=humaneval"])
    extras = [[], ["preset=smoke", "preset.n_windows=2", "results_dir=/tmp/x"],
              ["method.damp=0.1", "calibration.dataset=wikitext2", "kv_bits=4", "model=gemma3_270m"]]
    for (method, bits, task), extra in itertools.product(grid, extras):
        if extra and extra[0] == "method.damp=0.1" and method != "method=gptq":
            continue
        yield [method, bits, task, *extra]
    yield ["bits=4", "method=rtn", "task=wikitext2_long", "task.seq_len=1100", "+task.unknown_but_added=1"]


def test_composing_each_choice_of_groups_once_gives_every_job_hydras_config(hydra_conf):
    fast = cli._composer(compose)
    n = 0
    for job in _jobs():
        want = compose("config", overrides=job)
        got = fast(job)
        assert OmegaConf.to_container(got) == OmegaConf.to_container(want), job
        assert OmegaConf.is_struct(got) == OmegaConf.is_struct(want)
        assert cli.to_run_config(got) == cli.to_run_config(want), job
        n += 1
    assert n > 40


def test_a_bad_value_is_the_same_error_as_hydras(hydra_conf):
    fast = cli._composer(compose)
    for bad in (["method=gptq", "no_such_key=1"], ["method=gptq", "method.no_such_field=1"]):
        with pytest.raises(Exception) as want:
            compose("config", overrides=bad)
        with pytest.raises(Exception) as got:
            fast(bad)
        assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]
    with pytest.raises(Exception, match="no_such_method"):
        fast(["method=no_such_method", "bits=4"])
