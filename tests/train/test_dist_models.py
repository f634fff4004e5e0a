import pytest

from budgetlab import dist, models


def test_single_process_when_no_launcher():
    env = dist.from_environment({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")


def test_torchrun_variables():
    env = dist.from_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        (3, 8, 1, "n1", 1234)
    assert env.source == "torchrun"


def test_slurm_variables_first_host_and_job_port():
    vars_ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1"}
    env = dist.from_environment(vars_)
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "gpu03"
    # every task of the job derives the same port from the job id alone
    assert env.master_port == dist.from_environment({**vars_, "SLURM_PROCID": "0"}).master_port
    assert 1024 < env.master_port < 32768
    assert env.master_port != dist.from_environment({**vars_, "SLURM_JOB_ID": "123457"}).master_port


def test_submitit_local_variables():
    env = dist.from_environment({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1",
                                 "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
                                 "SUBMITIT_LOCAL_JOB_ID": "999"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "submitit")


def test_bad_rank_variable_is_named():
    with pytest.raises(ValueError, match="RANK='x'"):
        dist.from_environment({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_is_gloo_without_cuda():
    import torch

    if not torch.cuda.is_available():
        assert dist.from_environment({}).backend == "gloo"


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelRefError, match="does not exist"):
        models.resolve(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelRefError, match="not a Hugging Face model directory"):
        models.resolve(str(tmp_path / "empty"))


def test_hub_id_passes_through():
    assert models.resolve("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def test_tokenizer_without_pad_uses_eos(tiny_llama, caplog):
    tok = models.load_tokenizer(tiny_llama)
    assert tok.pad_token == tok.eos_token and tok.pad_from_eos
    assert "no pad token" in caplog.text


def test_load_model_from_local_dir(tiny_llama):
    import torch

    m = models.load_model(tiny_llama, dtype="fp32")
    assert m.dtype == torch.float32 and m.config.num_hidden_layers == 2
