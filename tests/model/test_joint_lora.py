"""Routed LoRA for joint training (lexlora/model/joint_lora.py): one forward of several jobs' rows
gives each job the loss and gradients of its own forward alone, under gradient checkpointing and
bf16 autocast too; each job's view generates and saves as its own adapter; unroutable layers are
refused."""

import pytest
import torch

from lexlora.data.prepare import prepare_data
from lexlora.data.tokenization import LexicalCollator
from lexlora.errors import ConfigError
from lexlora.model.factory import joint_model_for_run, model_for_run
from lexlora.model import joint_lora
from lexlora.model.joint_lora import decoder_groups
from lexlora.model.loading import load_base_model
from tests.conftest import tiny_model_config, tiny_train_config
from tests.training.runs import STDLIB


def job_configs(tmp_path, **lora):
    configs = []
    for index, (rank, mode, targets) in enumerate([(4, "add", None), (8, "prefix", ["q", "v"]), (2, "first", None)]):
        config = tiny_train_config(tmp_path, STDLIB)
        config.model = tiny_model_config(dropout_rate=0.0)
        config.lora.r, config.lora.target_modules, config.fusion.mode = rank, targets, mode
        config.train.seed = 40 + index
        for key, value in lora.items():
            setattr(config.lora, key, value)
        configs.append(config)
    return configs


@pytest.fixture()
def jobs(tmp_path, tokenizer):
    configs = job_configs(tmp_path)
    datas = [prepare_data(config, tokenizer, torch.device("cpu")) for config in configs]
    collator = LexicalCollator(tokenizer, None)
    # Batches of different sizes and lengths (rows from different places of the file).
    batches = [collator([datas[i].splits["train"][j] for j in range(7 * i, 7 * i + 2 + i)]) for i in range(3)]
    return configs, datas, batches


def grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("checkpointing, decoders", [(False, "one call"), (False, "one per job"), (True, "one call")])
def test_one_joint_forward_gives_each_job_the_loss_and_gradients_of_its_own(jobs, tokenizer, monkeypatch, checkpointing, decoders):
    configs, datas, batches = jobs
    for config in configs:
        config.train.gradient_checkpointing = checkpointing
    if decoders == "one per job":  # the encoder once, then a decoder call per job
        monkeypatch.setattr(joint_lora, "decoder_groups", lambda lengths, rows: [[k] for k in range(len(lengths))])
    else:  # every job's targets padded together, one call
        monkeypatch.setattr(joint_lora, "decoder_groups", lambda lengths, rows: [list(range(len(lengths)))])
    joint = joint_model_for_run(list(zip(configs, datas)), load_base_model(configs[0].model), tokenizer).train()
    assert joint.jobs[0].gradient_checkpointing == checkpointing
    calls = []
    joint.base_model.get_encoder().register_forward_pre_hook(lambda *_: calls.append("encoder"))
    joint.base_model.get_decoder().register_forward_pre_hook(lambda *_: calls.append("decoder"))
    losses = joint([2, 0, 1], [batches[2], batches[0], batches[1]])  # any order
    losses = [losses[1], losses[2], losses[0]]
    assert calls == ["encoder", "decoder"] if decoders == "one call" else ["encoder"] + ["decoder"] * 3
    torch.stack(losses).sum().backward()
    for index, (config, data, batch) in enumerate(zip(configs, datas, batches)):
        solo = model_for_run(config, load_base_model(config.model), tokenizer, data).train()
        view = joint.jobs[index]
        assert view.trainable_state_dict().keys() == solo.trainable_state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(view.trainable_state_dict().values(), solo.trainable_state_dict().values()))
        loss = solo(**batch).loss
        loss.backward()
        assert torch.allclose(losses[index], loss, rtol=1e-6)
        joint_grads = dict(zip(view.trainable_state_dict(), grads(view.own_parameters())))
        solo_grads = {k: p.grad for k, p in zip(solo.trainable_state_dict(), [p for p in solo.parameters() if p.requires_grad])}
        assert joint_grads.keys() == solo_grads.keys()
        for key, grad in solo_grads.items():  # float rounding alone (the matmuls see other shapes)
            assert (joint_grads[key] - grad).norm() <= 1e-5 * grad.norm(), key
        assert all(grad.norm() > 0 for key, grad in solo_grads.items() if "lora_A" not in key)  # (A's: zero while B is)


def test_under_bf16_autocast_the_joint_losses_match_each_jobs_own(jobs, tokenizer):
    configs, datas, batches = jobs
    joint = joint_model_for_run(list(zip(configs, datas)), load_base_model(configs[0].model), tokenizer).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = joint([2, 0], [batches[2], batches[0]])  # any subset, in any order
        alone = [joint.jobs[i](**batches[i]).loss for i in (2, 0)]
    for together, single in zip(losses, alone):
        assert torch.isfinite(together) and torch.allclose(together, single, rtol=2e-2)


def test_each_view_generates_and_saves_as_its_own_adapter(jobs, tokenizer):
    configs, datas, batches = jobs
    joint = joint_model_for_run(list(zip(configs, datas)), load_base_model(configs[0].model), tokenizer)
    with torch.no_grad():
        for view in joint.jobs:  # give every job's LoRA its own non-zero delta
            for param in view.own_parameters():
                param.normal_(0, 0.2)
    joint.eval()
    outputs = [view.generate_text(["os.py", "json/decoder.py"], max_new_tokens=4) for view in joint.jobs]
    for index, view in enumerate(joint.jobs):
        solo = model_for_run(configs[index], load_base_model(configs[index].model), tokenizer, datas[index]).eval()
        solo.load_trainable_state_dict(view.trainable_state_dict())
        assert solo.generate_text(["os.py", "json/decoder.py"], max_new_tokens=4) == outputs[index]
    state = joint.jobs[1].trainable_state_dict()
    assert all(".q." in k or ".v." in k for k in state if "lora_" in k)  # job 2 targets q and v only
    assert not any(".job" in k or ".default." in k for k in state)  # saved under PEFT's plain names


def test_a_layer_the_router_cannot_route_is_refused(tmp_path, tokenizer):
    configs = job_configs(tmp_path)[:2]
    configs[1].lora.use_dora = True
    datas = [prepare_data(config, tokenizer, torch.device("cpu")) for config in configs]
    with pytest.raises(ConfigError, match=r"joint training routes LoRA on linear layers only \(no DoRA\); .*\.q is a Linear with DoRA"):
        joint_model_for_run(list(zip(configs, datas)), load_base_model(configs[0].model), tokenizer)


def test_decoder_groups_merge_jobs_of_similar_target_lengths_only():
    assert decoder_groups([5, 6, 20, 22, 60], [8, 8, 8, 8, 8]) == [[0, 1], [2, 3], [4]]
    assert decoder_groups([10, 10, 10], [8, 2, 8]) == [[0, 1, 2]]
    assert decoder_groups([4, 40], [100, 1]) == [[0], [1]]  # 40 * 101 rows padded is far over 1.25x
