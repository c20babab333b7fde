"""Model cards, LoRA-only and variant exports, and the Hub push (its exact calls; no network)."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from stepdistill import cli, lifecycle
from stepdistill.export.hub import base_license, push_to_hub, upload_plan, write_model_card
from tests.helpers import PYTHON, REPO, run, tiny_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A one-step tiny DMD2 run whose generator is a LoRA on the teacher's base (checkpoint, no export)."""
    out = tmp_path_factory.mktemp("lora_run")
    cfg = tiny_config(out, "dmd2", "method.num_steps=1", "train.max_steps=1", "train.sample_every=1",
                      "export.enabled=false", "roles.generator.lora_rank=4", "roles.generator.lora_alpha=2",
                      "roles.generator.share_teacher_base=true", "roles.generator.lr=0.01")
    lifecycle.run(cfg)
    return out


def test_lora_only_export_loads_with_plain_diffusers_from_its_card(lora_run, tmp_path):
    out = tmp_path / "lora"
    assert cli.main(["export", str(lora_run), "--out", str(out), "--lora"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "pytorch_lora_weights.safetensors", "samples.png", "scheduler", "stepdistill.json"]
    info = json.loads((out / "stepdistill.json").read_text())
    assert info["lora_only"] and info["num_inference_steps"] == 1 and info["scheduler"] == "LCMScheduler"
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "lora" in card.data.tags and "dmd2" in card.data.tags
    assert "![samples](samples.png)" in card.text and "pipe.load_lora_weights" in card.text
    # The card's own usage snippet, run by plain diffusers in a process that never imports stepdistill.
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    from stepdistill.models.loading import resolve_pretrained

    assert "path/to/tiny-sd15" in snippet and resolve_pretrained("tiny:sd15") not in card.text  # no local path
    snippet = snippet.replace("path/to/this/folder", str(out)).replace(
        "path/to/tiny-sd15", resolve_pretrained("tiny:sd15")).replace(
        '"a photo of a cat", ', '"a red circle", height=64, width=64, output_type="np", ')
    code = snippet + "\nimport sys\nassert 'stepdistill' not in sys.modules\nprint('shape', image.shape)\n"
    proc = run([PYTHON, "-c", code], cwd=REPO)
    assert "shape (64, 64, 3)" in proc.stdout


def test_lora_flag_on_a_full_weight_student_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "full"
    lifecycle.run(tiny_config(run_dir, "dmd2", "train.max_steps=1", "train.sample_every=0",
                              "export.enabled=false"))
    with pytest.raises(SystemExit):
        cli.main(["export", str(run_dir), "--out", str(tmp_path / "o"), "--lora"])
    assert "is full weights, not a LoRA" in capsys.readouterr().err


def test_variant_export_and_card_metrics(lora_run, tmp_path):
    from diffusers import DiffusionPipeline

    # An evaluation's metrics.json in the run folder goes into the card as a table.
    metrics = {"teacher": "toy-sd", "prompts": "builtin:toy_all", "seeds_per_prompt": 2,
               "command": "stepdistill toy eval runs/x --seeds-per-prompt 2 --student-steps 1", "results": {
        "student 1-step": {"steps": 1, "guidance_scale": 0.0, "latency_ms_per_image": 5.0,
                           "all": {"fid": 1.5, "alignment": 0.97, "diversity": 2.0, "aligned_diversity": 1.75},
                           "held_out": {"fid": 2.5, "alignment": 0.95}}}}
    (lora_run / "metrics.json").write_text(json.dumps(metrics))
    try:
        out = tmp_path / "fp16"
        assert cli.main(["export", str(lora_run), "--out", str(out), "--variant", "fp16"]) == 0
    finally:
        (lora_run / "metrics.json").unlink()
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(out, variant="fp16", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    text = (out / "README.md").read_text()
    assert "| student 1-step | 1 | 1.50 | 97.0% | 2.50 | 95.0% | 2.000 | 1.750 | 5.0 |" in text
    assert "max_steps: 1" in text  # the resolved training config
    assert "Measured with `stepdistill toy eval runs/x --seeds-per-prompt 2 --student-steps 1`." in text


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls push_to_hub makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_makes_exactly_the_expected_calls(lora_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli.main(["export", str(lora_run), "--out", str(out), "--lora"]) == 0
    write_model_card(out, repo_id="me/tiny-dmd2-lora")
    assert "DiffusionPipeline, LCMScheduler" in (out / "README.md").read_text()
    assert "'me/tiny-dmd2-lora'" in (out / "README.md").read_text()
    capsys.readouterr()

    api = RecordingApi()
    assert push_to_hub(out, "me/tiny-dmd2-lora", private=True, dry_run=True, api=api) is None
    printed = capsys.readouterr().out
    assert api.calls == [] and "private model repo me/tiny-dmd2-lora" in printed
    for path, size in upload_plan(out):
        assert f"{path}  ({size:,} bytes)" in printed

    url = push_to_hub(out, "me/tiny-dmd2-lora", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-dmd2-lora"
    assert api.calls == [
        ("create_repo", {"repo_id": "me/tiny-dmd2-lora", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/tiny-dmd2-lora", "repo_type": "model", "folder_path": str(out),
                           "commit_message": "Upload distilled pipeline (stepdistill)"}),
    ]
    with pytest.raises(ValueError, match="USER_OR_ORG/NAME"):
        push_to_hub(out, "no-namespace", api=api)


def test_push_without_a_token_fails_before_exporting_and_never_leaks_one(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no cached login there
    with pytest.raises(SystemExit):
        cli.main(["export", str(lora_run), "--out", str(tmp_path / "o"), "--push-to-hub", "me/x"])
    assert "no Hugging Face token found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # With a token in the environment, a dry run exports and lists the files; the token appears nowhere.
    secret = "hf_NotARealTokenButSecret123"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "o2"
    assert cli.main(["export", str(lora_run), "--out", str(out), "--lora", "--push-to-hub", "me/x",
                     "--private", "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "would upload" in printed.out and secret not in printed.out + printed.err
    assert all(secret not in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_base_licenses():
    assert base_license("stabilityai/stable-diffusion-xl-base-1.0") == "openrail++"
    assert base_license("toy-sd") == "apache-2.0"
    assert base_license("someone/unknown-model") == "other"  # offline: the base card cannot be read
