"""Train-tab handlers without Gradio: the form → TrainSpec, captions, and a real job into the catalog."""

from __future__ import annotations

import time

import pytest

from pipelines.training import PRESETS
from studio.handlers import create, generate
from studio.handlers import train as T
from studio.handlers.state import SessionState
from tests.ui.fixtures import training_pictures

FAST = '{"sample_steps": 2, "sample_seeds": [1], "checkpoint_every": 2}'


def test_spec_from_the_form():
    spec = T.build_spec(
        T.TrainRequest(
            files=(),
            trigger="zq",
            class_word="dog",
            preset="quick",
            name="my dog",
            steps=12,
            resolution=0,
            options_json='{"use_dora": true}',
        )
    )
    assert (spec.trigger, spec.class_word, spec.name, spec.steps, spec.rank) == ("zq", "dog", "my dog", 12, 8)
    assert (
        spec.resolution is None and spec.use_dora and spec.prior_preservation is None and spec.uses_prior
    )  # the model's default: DreamBooth's prior with a class word
    off = T.TrainRequest(files=(), trigger="zq", class_word="dog", prior_preservation=T.PRIOR_CHOICES["off"])
    assert T.build_spec(off).prior_preservation is False and not T.build_spec(off).uses_prior
    assert T.build_spec(T.TrainRequest(files=(), trigger="zq", preset="quality")).rank == 32
    prompts = T.TrainRequest(files=(), trigger="zq", options_json='{"prior_prompts": ["a dog", "a cat"]}')
    assert T.build_spec(prompts).prior_prompts == ("a dog", "a cat")  # a JSON list becomes the tuple
    assert (
        T.preset_fields("balanced")["steps"] is None  # left to the model's family
        and T.preset_fields("quick")["rank"] == PRESETS["quick"]["rank"]
    )
    # an unticked text-encoder box leaves it to the model, unless the preset turns it on
    unticked = T.TrainRequest(files=(), trigger="zq", train_text_encoder=False)
    assert T.build_spec(unticked).train_text_encoder is None
    off = T.TrainRequest(files=(), trigger="zq", preset="quality", train_text_encoder=False)
    assert T.build_spec(off).train_text_encoder is False


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(trigger=" "), "type a trigger word"),
        (dict(preset="epic"), "unknown preset"),
        (dict(options_json='{"rnak": 4}'), "unknown training option"),
        (dict(options_json="[1]"), "JSON object"),
        (dict(options_json="{"), "not valid JSON"),
        (dict(prior_preservation=True), "needs a class word"),
        (dict(steps=0), "steps must be"),
        (dict(learning_rate=-1.0), "learning_rate must be"),
    ],
)
def test_spec_errors_say_what_is_wrong(changes, match):
    with pytest.raises(ValueError, match=match):
        T.build_spec(T.TrainRequest(**{"files": (), "trigger": "zq", **changes}))


def test_caption_table(tmp_path):
    pics = training_pictures(tmp_path, n=2)
    (tmp_path / "pic_1.txt").write_text("a zq circle on grass\n")
    files = [str(p) for p in pics] + [str(tmp_path / "pic_1.txt")]
    rows = T.caption_rows(files)
    assert rows == [["pic_0.png", ""], ["pic_1.png", "a zq circle on grass"]]
    rows[0][1] = "  a zq ring "
    assert T.captions_from_rows(rows) == {"pic_0": "a zq ring", "pic_1": "a zq circle on grass"}
    assert T.captions_from_rows(None) == {}


def test_training_job_lands_in_the_catalog_and_the_mix(fresh_studio, tmp_path):
    services, _ = fresh_studio
    services.jobs.start()
    pics = training_pictures(tmp_path / "pics", n=5)
    req = T.TrainRequest(
        files=tuple(map(str, pics)),
        trigger="qx",
        name="my circle",
        preset="quick",
        steps=4,
        resolution=32,
        sample_every=2,
        captions={"pic_0": "a qx circle"},
        prior_preservation=False,  # the pocket model's own prior renders 100 class images first
        options_json=FAST,
    )
    state, job = T.start_training(services, SessionState(), req)
    assert state.jobs == (job,)
    deadline = time.monotonic() + 300
    while not (view := T.job_view(services, job)).finished and time.monotonic() < deadline:
        time.sleep(0.3)
    assert view.status == "done", view.reason
    assert (view.step, view.total) == (4, 4) and view.adapter_id and "done" in view.progress_html
    assert [s for s, _ in services.monitor.losses(job)] == [1, 2, 3, 4]
    assert view.loss_image is not None and sorted({c for _, c in view.samples}) == ["step 2", "step 4"]
    assert view.data()["finished"] is True
    rows = T.jobs_table(services, state)
    assert [r[:4] + r[5:] for r in rows] == [[job[:8], "my circle", "done", "4/4", "yes"]]
    assert T.job_view(services, job[:8]).status == "done"  # the table shows 8 characters of the id
    record = create.resolve_adapter(services, T.trained_adapter_ref(services, job))
    assert record.name == "my circle" and "qx" in record.trigger_words and "trained" in record.tags
    assert any(i.prompt == "a qx circle" for i in record.images)  # captions feed retrieval
    state, _ = create.add_adapter(services, state, record.id)
    res = generate.generate(
        services, state, generate.GenerateRequest("a qx circle", seed=1, steps=2, width=32, height=32)
    )
    assert len(res.images) == 1
    assert T.cancel_job(services, job) == "done"
    with pytest.raises(ValueError, match="nothing to resume"):
        T.resume_job(services, job)
    with pytest.raises(KeyError):
        T.job_view(services, "f" * 32)
    with pytest.raises(ValueError, match="upload the pictures"):
        T.start_training(services, state, T.TrainRequest(files=(), trigger="qx"))
