"""``reslab diagnose`` on a tiny trained run of every family: every measurement runs or refuses in one line, the
figures are titled and labelled, ``--help`` lists the registry, and stdout carries each measurement's key numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reslab.cli import main
from reslab.diagnostics.diagnose import MEASUREMENTS, diagnose
from reslab.train import TrainConfig, train

# name -> (model, residual, data, family options): every family, with schemes that switch measurements on and off
RUNS = {
    "mlp": ("mlp4", "highway", "mnist1d:200", dict(width=8)),
    "preact_mlp": ("preact_mlp4", "identity", "mnist1d:200", dict(width=8)),
    "resnet": ("resnet8", "identity", "digits", dict(width=4)),
    "preact_resnet": ("preact_resnet8", "identity", "digits", dict(width=4)),
    "gpt": ("gpt1", "attnres", "pydoc:16", dict(d_model=16, n_heads=2)),  # the run of the crash report, smaller
    "densenet": ("densenet10", "concat", "digits", dict(growth=4)),
}
# what each run refuses, and the reason's key words
REFUSED = {
    "mlp": {"paths": "additive", "decomposition": "activates the stream"},
    "preact_mlp": {"gates": "no highway gates"},
    "resnet": {"gates": "no highway gates", "decomposition": "activates the stream"},
    "preact_resnet": {"gates": "no highway gates"},
    "gpt": {"gates": "no highway gates", "paths": "additive"},
    "densenet": {"gates": "no highway gates", "paths": "additive", "decomposition": "does not decompose"},
}
SAMPLES = "12"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per entry of RUNS (64 training samples, one epoch; 64 test samples for speed)."""
    from reslab.data import load_dataset

    root = tmp_path_factory.mktemp("diagnose")
    out = {}
    for name, (model, residual, data, kw) in RUNS.items():
        ds = load_dataset(data)
        ds = dataclasses.replace(ds, x_test=ds.x_test[:64], y_test=ds.y_test[:64])
        cfg = TrainConfig(model=model, residual=residual, data=data, model_kwargs=kw, epochs=1, batch_size=32,
                          optimizer="adam", lr=3e-3, train_samples=64, eval_train=False, seed=0)
        assert train(cfg, root / name, quiet=True, data=ds).status == "completed"
        out[name] = root / name
    return out


def _arrays(run_dir, name):
    """A measurement's saved arrays (measured now unless the default-diagnose test already wrote them)."""
    path = run_dir / "diagnostics" / f"{name}.npz"
    if not path.exists():
        diagnose(run_dir, [name], samples=int(SAMPLES), plots=False)
    return dict(np.load(path))


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return code, got.out, got.err


KEY_NUMBERS = {"responses": "branch-output std", "stream": "growth", "grads": "ratio first/last",
               "gates": "mean transform gate", "lesion": "error intact", "paths": "effective depth",
               "update": "Adam", "decomposition": "projections sum to 1.000", "lens": "KL(final || decoded)"}


DRAWN = ("mlp", "gpt")  # figures are saved for these runs; the others skip them for speed (see the figure test)


@pytest.mark.parametrize("run", list(RUNS))
def test_default_diagnose_runs_every_measurement_that_applies(run, runs, capsys):
    """The CLI default measures everything that applies (the gpt/attnres run crashed here: a classifier loss
    computed by hand on (N, T, V) logits) and skips the rest with the reason; stdout has the key numbers."""
    d = runs[run]
    code, out, err = _run(["diagnose", str(d), "--samples", SAMPLES] + ([] if run in DRAWN else ["--no-plots"]),
                          capsys)
    assert code == 0, err
    for name in MEASUREMENTS:
        line = next(l for l in out.splitlines() if l.startswith(f"{name}: "))
        if name in REFUSED[run]:
            assert "skipped" in line and REFUSED[run][name] in line, line
            assert not (d / "diagnostics" / f"{name}.npz").exists()
            continue
        assert KEY_NUMBERS[name] in line, line
        assert "nan" not in line, line
        arrays = np.load(d / "diagnostics" / f"{name}.npz")
        assert arrays.files
        png = d / "diagnostics" / f"{name}.png"
        assert png.stat().st_size > 5000 if run in DRAWN else not png.exists()


@pytest.mark.parametrize("run", list(RUNS))
def test_a_requested_measurement_without_meaning_is_refused_in_one_line(run, runs, capsys):
    d = runs[run]
    for name, why in REFUSED[run].items():  # refused before anything is measured or written
        with pytest.raises(ValueError, match=why) as e:
            diagnose(d, ["responses", name], samples=4)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{name} does not apply")
        code, _, err = _run(["diagnose", str(d), "--what", name], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_language_model_measurements_are_per_token(runs):
    """The crash report's run (gpt / attnres): the arrays are per token and per sublayer."""
    d = runs["gpt"]
    dec = _arrays(d, "decomposition")
    assert list(dec["labels"]) == ["embed", "attn0", "mlp0"] and abs(dec["projections"].sum() - 1) < 1e-4
    assert dec["direct_logit_attribution"].shape == (3,)
    lens = _arrays(d, "lens")
    assert lens["kl"][-1] < 1e-6 and np.isfinite(lens["loss"]).all()
    assert _arrays(d, "lesion")["single"].shape == (2,)
    assert _arrays(d, "grads")["stream"].shape == (2,)


def test_paths_and_gates_take_token_targets():
    """Unit level, the root cause: path cotangents (and the whole paths measurement) and per-class gates on a
    language model's (N, T) next-token targets."""
    import matplotlib.pyplot as plt

    import reslab
    from reslab.diagnostics.gates import gate_profile
    from reslab.diagnostics.paths import analyse_paths, model_cotangent

    torch.manual_seed(0)
    gpt = reslab.create_model("gpt1", "preln", num_classes=11, input_shape=(5,), d_model=8, n_heads=2).eval()
    x, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    x0, g = model_cotangent(gpt, x, y)
    assert g.shape == x0.shape == (3, 5, 8)
    prof = analyse_paths(gpt, x, y, samples=4)
    assert prof.exact_norm.shape == (3,)  # path lengths 0, 1, 2 through the two sublayers
    x0 = x0.clone().requires_grad_(True)
    (true,) = torch.autograd.grad((gpt.trunk(x0) * g).sum(), x0)  # the paths add up to the true input gradient
    assert np.isclose(prof.full_grad_norm, float(true.norm()), rtol=1e-4)
    from reslab.diagnostics.figures import Context

    paths = MEASUREMENTS["paths"]
    arrays = {k: np.asarray(v) for k, v in paths(gpt, x, y, 11).items()}
    ctx = Context("gpt1 / preln (test)", ("attn0", "mlp0"), "sublayer", "token")
    assert "effective depth" in paths.summary(arrays, ctx)
    plt.close(paths.plot(arrays, ctx))
    hwy = reslab.create_model("gpt1", "highway", num_classes=11, input_shape=(5,), d_model=8, n_heads=2).eval()
    p = gate_profile(hwy, x, y, 11)
    assert p.per_class.shape == (2, 11)
    present = sorted(set(y.flatten().tolist()))
    assert np.isfinite(p.per_class[:, present]).all()


def test_cnn_lesions_and_lens_respect_stage_boundaries(runs):
    """A ResNet's stage-changing blocks stay in random lesions' pool size, and the logit lens leaves the streams
    of other shapes undecoded (NaN) instead of failing."""
    lesion = _arrays(runs["resnet"], "lesion")
    assert list(lesion["ks"]) == [1] and len(lesion["single"]) == 3  # 3 blocks, 2 change shape: 1 deletable
    lens = _arrays(runs["resnet"], "lens")
    assert np.isnan(lens["kl"][:-1]).all() and lens["kl"][-1] < 1e-6  # only the final stream has the final width


def test_densenet_lesions_delete_dense_layers_only(runs):
    """DenseNet's transitions cannot be deleted (NaN in the single lesions, not in the random pool); its layers
    cannot be reordered (no reorderings measured)."""
    lesion = _arrays(runs["densenet"], "lesion")
    single = lesion["single"]  # layer, layer, transition, layer, layer, transition, layer, layer
    assert len(single) == 8 and list(np.flatnonzero(np.isnan(single))) == [2, 5]
    assert list(lesion["ks"]) == [1, 2, 3] and lesion["k_errors"].shape == (3, 5)
    assert len(lesion["taus"]) == len(lesion["reorder_errors"]) == 0


def test_figures_have_titles_axis_labels_and_one_unit_per_axis(runs):
    import matplotlib.pyplot as plt

    from reslab.diagnostics.figures import Context
    from reslab.train import load_model

    for run in RUNS:  # drawn without rendering: every family's figures, titled and labelled
        model, cfg = load_model(runs[run])
        ctx = Context.of(model, cfg, torch.zeros(2, 16) if run.startswith("gpt") else torch.zeros(2))
        for name in MEASUREMENTS:
            if name in REFUSED[run]:
                continue
            fig = MEASUREMENTS[name].plot(_arrays(runs[run], name), ctx)
            assert f"{cfg.model} / {cfg.residual}" in fig._suptitle.get_text()
            if name == "stream":  # norm, energy per coordinate and shares: three units, three panels
                assert len(fig.axes) == 3
            for ax in fig.axes:
                if ax.get_label() == "<colorbar>":
                    assert ax.get_ylabel()
                    continue
                assert ax.get_xlabel() and ax.get_ylabel(), (run, name)
            plt.close(fig)


def test_help_lists_every_measurement(capsys):
    code, out, _ = _run(["diagnose", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name, m in MEASUREMENTS.items():
        assert f"{name} {' '.join(m.description.split())}" in flat


def test_bad_requests_fail_before_loading(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown measurement 'nosuch'"):
        diagnose(tmp_path, ["nosuch"])
    code, _, err = _run(["diagnose", str(tmp_path), "--what", ","], capsys)
    assert code == 2 and "names no measurement" in err
