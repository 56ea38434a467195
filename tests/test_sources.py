"""Official checkpoints by name (vitcore.sources): spec resolution, AugReg's index.csv rule served from 127.0.0.1
through VITCORE_MODELS_URL, downloads that never replace anything but a regular file, and the inference CLIs
(predict / evaluate / attention_map) on official files."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import re
import threading

import numpy as np
import pytest
import reference_vit as ref
from PIL import Image

import vitcore
from vitcore import labels, sources
from vitcore.download import DownloadError
from vitcore.sources import SourceError

# The columns of the real augreg/index.csv, in its order.
INDEX_COLUMNS = ["name", "ds", "epochs", "lr", "aug", "wd", "do", "sd", "best_val", "final_val", "final_test",
                 "adapt_ds", "adapt_lr", "adapt_steps", "adapt_resolution", "adapt_final_val", "adapt_final_test",
                 "params", "infer_samples_per_sec", "filename", "adapt_filename"]
TI_BEST = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"
TI_FINETUNED = TI_BEST + "--imagenet2012-steps_20k-lr_0.03-res_384"


def _row(name, ds, final_val, filename, adapt_filename=""):
    row = dict.fromkeys(INDEX_COLUMNS, "0.0")
    row.update(name=name, ds=ds, final_val=final_val, filename=filename, adapt_filename=adapt_filename,
               adapt_ds="imagenet2012", aug="none", params="5717416")
    return row


# Each row that must not win says why: another dataset, another model whose name contains "Ti_16", a lower score,
# a missing score.
INDEX_ROWS = [
    _row("Ti/16", "i21k", "0.401", "Ti_16-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0"),
    _row("Ti/16", "i1k", "0.901", "Ti_16-i1k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"),
    _row("R+Ti/16", "i21k", "0.871", "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"),
    _row("Ti/16", "i21k", "0.442", TI_BEST, TI_FINETUNED),
    _row("Ti/16", "i21k", "0.442", TI_BEST, TI_BEST + "--cifar100-steps_10k-lr_0.003-res_224"),
    _row("Ti/16", "i21k_30", "0.811", "Ti_16-i21k_30-30ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"),
    _row("Ti/16", "i21k", "", "Ti_16-i21k-300ep-lr_0.003-aug_none-wd_0.1-do_0.1-sd_0.1"),
    _row("S/16", "i21k", "0.611", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"),
]


class _Server:
    """A static file server on 127.0.0.1 that records the paths asked for."""

    def __init__(self, root):
        self.requests: list[str] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                log.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A copy of the bucket's layout served locally, VITCORE_MODELS_URL pointing at it."""
    root = tmp_path / "bucket"
    for folder in sources.SOURCES.values():
        (root / folder).mkdir(parents=True)
    with open(root / "augreg" / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(INDEX_ROWS)
    server = _Server(str(root))
    monkeypatch.setenv("VITCORE_MODELS_URL", server.url + "/")  # a trailing slash is fine
    yield root, server
    server.close()


def _savez(path, params):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(f, **params)


def _tiny_npz(path, num_classes=3, seed=0):
    _savez(path, ref.random_params(vitcore.CONFIGS["testing"], 32, num_classes, np.random.default_rng(seed)))
    return path.read_bytes()


def _dead_url():
    # A port nothing listens on: bind one, then close it.
    s = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = s.server_address[1]
    s.server_close()
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec, path, url, model, img", [
    ("i21k:ViT-B_16", "ViT-B_16.npz", "imagenet21k/ViT-B_16.npz", "ViT-B_16", 224),
    ("i21k:R50-ViT-B_16", "R50+ViT-B_16.npz", "imagenet21k/R50+ViT-B_16.npz", "R50+ViT-B_16", 224),
    ("i21k+i1k:ViT-B_16", "imagenet21k+imagenet2012/ViT-B_16.npz", "imagenet21k+imagenet2012/ViT-B_16.npz",
     "ViT-B_16", None),
    ("i21k+i1k:ViT-L_16-224", "imagenet21k+imagenet2012/ViT-L_16-224.npz",
     "imagenet21k+imagenet2012/ViT-L_16-224.npz", "ViT-L_16", 224),
    ("sam:ViT-B_32", "sam/ViT-B_32.npz", "sam/ViT-B_32.npz", "ViT-B_32", 224),
    ("augreg:" + TI_FINETUNED, f"augreg/{TI_FINETUNED}.npz", f"augreg/{TI_FINETUNED}.npz", "ViT-Ti_16", 384),
    ("augreg:R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
     "augreg/R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
     "augreg/R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz", "R26+ViT-S_32", 224),
])
def test_named_sources_resolve_without_io(tmp_path, monkeypatch, spec, path, url, model, img):
    monkeypatch.delenv("VITCORE_MODELS_URL", raising=False)
    where = sources.locate(spec, str(tmp_path))
    assert where == sources.Pretrained(spec, os.path.join(tmp_path, path),
                                       "https://storage.googleapis.com/vit_models/" + url, model, img)
    assert sources.spec_model_type(spec) == model
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("VITCORE_MODELS_URL", "http://mirror.example/vit")
    assert sources.locate(spec, str(tmp_path)).url == "http://mirror.example/vit/" + url


@pytest.mark.parametrize("spec, match", [
    ("i21k:ViT-B_99", r"i21k:ViT-B_99: unknown model type 'ViT-B_99'; valid names: testing"),
    ("sam:", "unknown model type ''"),
    ("augreg:ViT-B_16", r"file name starts with its model \(Ti_16, .*\), not 'ViT'"),
    ("augreg:L_32", r"AugReg has no model 'L_32'; its models: Ti_16"),
    ("augreg:../../etc/passwd", "is not an AugReg model or file name"),
    ("augreg:B_16-i21k/../../x", "is not an AugReg model or file name"),
])
def test_specs_that_name_nothing_are_one_line_errors(tmp_path, spec, match):
    with pytest.raises(SourceError, match=match) as e:
        sources.locate(spec, str(tmp_path))
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_paths_are_never_downloaded(tmp_path, bucket):
    _, server = bucket
    for typo in ("my_finetuned.npzz", "i21:ViT-B_16", str(tmp_path / "nowhere" / "ViT-B_16.npz")):
        with pytest.raises(FileNotFoundError, match="does not exist .*named sources: i21k:NAME"):
            vitcore.pretrained(typo, str(tmp_path / "checkpoint"))
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"ViT-B_16.npz does not exist; .*e.g. i21k:ViT-B_16"):
        vitcore.pretrained(str(folder), str(tmp_path / "checkpoint"), model_type="ViT-B_16")
    with pytest.raises(SourceError, match="is a folder"):
        vitcore.pretrained(str(folder), str(tmp_path / "checkpoint"))
    assert server.requests == [] and not (tmp_path / "checkpoint").exists()
    # A folder holding the official name of an alias's model is found (vit_jax's --pretrained_dir folder).
    _tiny_npz(folder / "R50+ViT-B_16.npz")
    assert vitcore.pretrained(str(folder), model_type="R50-ViT-B_16") == str(folder / "R50+ViT-B_16.npz")
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(SourceError, match="not a regular file"):
        vitcore.pretrained(str(tmp_path / "pipe.npz"))


# ----------------------------------------------------------------------------- downloads


def test_download_into_the_checkpoint_folder_with_a_progress_bar(tmp_path, bucket, capsys):
    root, server = bucket
    served = _tiny_npz(root / "imagenet21k+imagenet2012" / "ViT-B_16.npz")
    folder = tmp_path / "checkpoint"
    path = vitcore.pretrained("i21k+i1k:ViT-B_16", str(folder))
    assert path == str(folder / "imagenet21k+imagenet2012" / "ViT-B_16.npz")
    assert open(path, "rb").read() == served
    assert os.listdir(folder / "imagenet21k+imagenet2012") == ["ViT-B_16.npz"]  # the temp file was renamed
    bar = capsys.readouterr().err
    assert "ViT-B_16.npz" in bar and "100%" in bar
    # There now: used as is, nothing fetched again.
    assert vitcore.pretrained("i21k+i1k:ViT-B_16", str(folder), progress=False) == path
    assert server.requests == ["/imagenet21k+imagenet2012/ViT-B_16.npz"]


def test_offline_message_names_the_url_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCORE_MODELS_URL", _dead_url())
    folder = tmp_path / "checkpoint"
    with pytest.raises(DownloadError) as e:
        vitcore.pretrained("sam:ViT-B_16", str(folder), progress=False)
    msg = str(e.value)
    assert msg.startswith("sam:ViT-B_16: cannot download " + os.environ["VITCORE_MODELS_URL"] + "/sam/ViT-B_16.npz")
    assert f"put it at {folder / 'sam' / 'ViT-B_16.npz'}" in msg and "\n" not in msg
    assert os.listdir(folder / "sam") == []


@pytest.mark.parametrize("kind", ["fifo", "devnull_link", "folder"])
def test_a_download_never_replaces_anything_but_a_regular_file(tmp_path, bucket, kind):
    root, server = bucket
    _tiny_npz(root / "imagenet21k" / "ViT-B_16.npz")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    target = folder / "ViT-B_16.npz"
    {"fifo": lambda: os.mkfifo(target), "devnull_link": lambda: os.symlink(os.devnull, target),
     "folder": lambda: target.mkdir()}[kind]()
    with pytest.raises(DownloadError, match="exists and is not a regular file .*refusing to download over it"):
        vitcore.pretrained("i21k:ViT-B_16", str(folder), progress=False)
    assert os.path.lexists(target) and not os.path.isfile(target)
    assert server.requests == [] and os.listdir(folder) == ["ViT-B_16.npz"]


# ----------------------------------------------------------------------------- AugReg


def test_augreg_model_name_picks_the_best_i21k_pretraining_by_final_val(tmp_path, bucket):
    root, server = bucket
    served = _tiny_npz(root / "augreg" / f"{TI_BEST}.npz")
    folder = tmp_path / "checkpoint"
    rows = sources.read_augreg_index(str(folder), progress=False)
    assert [r["filename"] for r in rows] == [r["filename"] for r in INDEX_ROWS]
    assert sources.augreg_best(rows, "Ti_16")["filename"] == TI_BEST
    assert sources.augreg_best(rows, "R_Ti_16")["filename"].startswith("R_Ti_16-i21k-")
    with pytest.raises(SourceError, match="lists no i21k pre-training of B_16; it has: R_Ti_16, S_16, Ti_16"):
        sources.augreg_best(rows, "B_16")

    where = sources.locate("augreg:Ti_16", str(folder), progress=False)
    assert (where.model_type, where.img_size, where.path) == ("ViT-Ti_16", 224,
                                                              str(folder / "augreg" / f"{TI_BEST}.npz"))
    assert open(vitcore.pretrained("augreg:Ti_16", str(folder), progress=False), "rb").read() == served
    assert server.requests == ["/augreg/index.csv", f"/augreg/{TI_BEST}.npz"]  # the index once: it is cached
    assert sorted(os.listdir(folder / "augreg")) == sorted(["index.csv", f"{TI_BEST}.npz"])


def test_augreg_fine_tuned_file_by_full_name(tmp_path, bucket):
    root, server = bucket
    served = _tiny_npz(root / "augreg" / f"{TI_FINETUNED}.npz", num_classes=1000)
    where = sources.locate("augreg:" + TI_FINETUNED, str(tmp_path))
    assert (where.model_type, where.img_size) == ("ViT-Ti_16", 384)
    assert open(vitcore.pretrained("augreg:" + TI_FINETUNED, str(tmp_path), progress=False), "rb").read() == served
    assert server.requests == [f"/augreg/{TI_FINETUNED}.npz"]  # a file name needs no index


def test_a_damaged_index_cache_says_how_to_refresh_it(tmp_path):
    (tmp_path / "augreg").mkdir()
    (tmp_path / "augreg" / "index.csv").write_text("name,ds\nB/16,i21k\n")
    with pytest.raises(SourceError, match=r"index.csv is not AugReg's index.csv \(no column filename, final_val\); "
                                          "delete it"):
        sources.locate("augreg:B_16", str(tmp_path))


# ----------------------------------------------------------------------------- inference CLIs


def _image(path, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def _imagenet_npz(path, top=(207, 1, 999)):
    """A 1000-class official-layout file whose head ranks `top` first, second, third for any image."""
    params = ref.random_params(vitcore.CONFIGS["testing"], 32, 1000, np.random.default_rng(3))
    params["head/kernel"][:] = 0.0
    params["head/bias"][:] = 0.0
    for rank, k in enumerate(top):
        params["head/bias"][k] = 10.0 - 3 * rank
    _savez(path, params)
    return str(path)


def test_predict_on_an_official_1000_class_file_prints_imagenet_names(tmp_path, capsys):
    from train import predict

    weights = _imagenet_npz(tmp_path / "weights.bin")  # an npz by its contents, whatever its name
    image = _image(tmp_path / "photo.png")
    assert predict.main(["--checkpoint", weights, image, "--top_k", "3", "--backend", "torch"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{image}: golden retriever ") and ", goldfish " in out and ", toilet tissue " in out
    assert out.count("%") == 3
    assert labels.imagenet1k_classes()[207] == "golden retriever"
    assert labels.imagenet1k_wnids()[:2] == ["n01440764", "n01443537"]


def test_the_class_list_is_the_official_label_order():
    wnids, names = labels.imagenet1k_wnids(), labels.imagenet1k_classes()
    assert len(wnids) == len(set(wnids)) == len(names) == 1000
    assert wnids == sorted(wnids)  # ILSVRC2012's labels are the synsets in wnid order
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[999] == "toilet tissue"
    assert labels.class_names(7) == [str(i) for i in range(7)]


def test_predict_with_a_named_source_downloads_it_into_checkpoint(tmp_path, bucket, capsys, monkeypatch):
    from train import predict

    root, _ = bucket
    _imagenet_npz(root / "imagenet21k+imagenet2012" / "ViT-B_16.npz")
    monkeypatch.chdir(tmp_path)
    image = _image(tmp_path / "photo.png")
    # The spec says ViT-B_16 but the served file is a "testing" model: refused, naming both.
    assert predict.main(["--checkpoint", "i21k+i1k:ViT-B_16", image, "--backend", "torch"]) == 2
    text = capsys.readouterr().err
    err = text.strip().splitlines()  # the download's progress bar, then the error
    assert "100%" in text and err[-1].startswith("train.predict: error: ")
    assert err[-1].endswith("is not a ViT-B_16 checkpoint: its arrays are those of testing (10 wide, depth 1, "
                            "patch 16)")
    assert os.path.isfile(tmp_path / "checkpoint" / "imagenet21k+imagenet2012" / "ViT-B_16.npz")


@pytest.mark.parametrize("argv, match", [
    (["--top_k", "0"], r"--top_k 0: must be >= 1"),
    (["--model_type", "ViT-B_16"], r"is not a ViT-B_16 checkpoint: its arrays are those of testing"),
    (["--model_type", "ViT-Q"], r"--model_type: unknown model type 'ViT-Q'"),
    (["--img_size", "40"], r"--img_size 40 is not a positive multiple of the model's input stride 16"),
])
def test_predict_bad_flags_are_one_line_errors(tmp_path, capsys, argv, match):
    from train import predict

    weights = _imagenet_npz(tmp_path / "w.npz")
    assert predict.main(["--checkpoint", weights, _image(tmp_path / "a.png"), "--backend", "torch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.predict: error: ")
    assert re.search(match, err), err


def test_predict_at_another_resolution_resizes_the_grid(tmp_path, capsys):
    from train import predict

    weights = _imagenet_npz(tmp_path / "w.npz")
    assert predict.main(["--checkpoint", weights, _image(tmp_path / "a.png"), "--img_size", "64", "--top_k", "1",
                         "--backend", "torch"]) == 0
    assert "golden retriever" in capsys.readouterr().out


def test_attention_map_from_an_official_file_and_a_bad_out_format(tmp_path, capsys):
    from train import attention_map

    weights = _imagenet_npz(tmp_path / "w.npz")
    image = _image(tmp_path / "a.png")
    assert attention_map.main(["--checkpoint", weights, "--image", image, "--out", str(tmp_path / "x.xyz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".xyz is not an image format matplotlib writes; use one of " in err
    assert ".png" in err and not (tmp_path / "x.xyz").exists()
    out = tmp_path / "maps" / "map.svg"
    assert attention_map.main(["--checkpoint", weights, "--image", image, "--out", str(out)]) == 0
    assert "predicted golden retriever" in capsys.readouterr().out
    assert out.read_text().lstrip().startswith("<?xml") and os.listdir(out.parent) == ["map.svg"]


def test_evaluate_refuses_an_imagenet_head_on_cifar_before_downloading(tmp_path, capsys, bucket):
    from train import evaluate

    _, server = bucket
    weights = _imagenet_npz(tmp_path / "w.npz")
    argv = ["--checkpoint", weights, "--dataset", "cifar10", "--data_dir", str(tmp_path / "data")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "has a 1000-class head and cifar10 has 10 classes: fine-tune it first" in err
    assert not (tmp_path / "data").exists()


def test_evaluate_an_imagenet_head_on_a_wnid_image_folder(tmp_path, capsys):
    from train import evaluate

    weights = _imagenet_npz(tmp_path / "w.npz", top=(207, 1, 999))
    for wnid, n in (("n02099601", 3), ("n01443537", 1)):  # golden retriever (207) and goldfish (1)
        (tmp_path / "val" / "test" / wnid).mkdir(parents=True)
        for i in range(n):
            _image(tmp_path / "val" / "test" / wnid / f"{i}.png", seed=i)
    argv = ["--checkpoint", weights, "--dataset", "imagefolder", "--data_dir", str(tmp_path / "val"),
            "--backend", "torch"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "(testing, 32 px) on imagefolder test (4 images): accuracy 75.00%" in out  # every image: class 207


def test_save_npz_of_a_fine_tuned_run_predicts_like_the_run(tmp_path, capsys):
    """A run's model exported with save_npz is an official file: predict gives the same ranking from both."""
    import torch

    from train import predict
    from train.checkpointing import save_checkpoint

    cfg = vitcore.CONFIGS["testing"]
    torch.manual_seed(0)
    model = vitcore.VisionTransformer(cfg, img_size=32, num_classes=1000, backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "img_size": 32, "num_classes": 1000,
                     "model_type": "testing", "step": 7}, str(tmp_path / "best.pt"))
    vitcore.save_npz(model, tmp_path / "exported.npz")
    image = _image(tmp_path / "a.png")
    lines = []
    for ck in ("best.pt", "exported.npz"):
        assert predict.main(["--checkpoint", str(tmp_path / ck), image, "--backend", "torch"]) == 0
        lines.append(capsys.readouterr().out.split(": ", 1)[1])
    ranked = [name.rsplit(" ", 1)[0] for name in lines[1].split(", ")]
    assert ranked[0] in labels.imagenet1k_classes()
    # The run prints indices (it has no class names stored), the export ImageNet's names: the same classes.
    run_ranked = [int(x.rsplit(" ", 1)[0]) for x in lines[0].split(", ")]
    assert [labels.imagenet1k_classes()[i] for i in run_ranked] == ranked
    assert [x.rsplit(" ", 1)[1] for x in lines[0].split(", ")] == [x.rsplit(" ", 1)[1] for x in lines[1].split(", ")]


# ----------------------------------------------------------------------------- fine-tuning's --pretrained_dir


def test_pretrained_dir_names_the_model_without_downloading(tmp_path, bucket):
    from train.args import UsageError
    from train.args import parse_args as parse_flags

    def parse_args(argv):  # --device cpu: a big model is refused on a CPU unless asked for explicitly
        return parse_flags([*argv, "--device", "cpu"])

    _, server = bucket
    assert parse_args(["--pretrained_dir", "augreg:Ti_16"]).model_type == "ViT-Ti_16"
    assert parse_args(["--pretrained_dir", "i21k+i1k:ViT-L_16-224"]).model_type == "ViT-L_16"
    assert parse_args(["--pretrained_dir", "augreg:R_Ti_16", "--model_type", "R_Ti_16"]).model_type == "R_Ti_16"
    assert parse_args([]).model_type == "ViT-B_16" and parse_args(["--pretrained_dir", "none"]).model_type == "ViT-B_16"
    weights = tmp_path / "my_finetuned.npz"
    _tiny_npz(weights)
    assert parse_args(["--pretrained_dir", str(weights), "--img_size", "32"]).model_type == "testing"
    with pytest.raises(UsageError, match="--model_type ViT-B_16 contradicts --pretrained_dir sam:ViT-B_32, a ViT-B_32"):
        parse_args(["--model_type", "ViT-B_16", "--pretrained_dir", "sam:ViT-B_32"])
    with pytest.raises(UsageError, match="--pretrained_dir augreg:L_32: AugReg has no model 'L_32'"):
        parse_args(["--pretrained_dir", "augreg:L_32"])
    # The typo of issue 15: an explicit file that does not exist is an error, never a download into that name.
    with pytest.raises(FileNotFoundError, match="my_finetuned.npzz does not exist"):
        parse_args(["--pretrained_dir", str(tmp_path / "my_finetuned.npzz")])
    assert server.requests == [] and not os.path.exists(tmp_path / "my_finetuned.npzz")


def test_finetune_from_a_named_source_downloads_it_once(tmp_path, bucket, monkeypatch, capsys):
    from cifar_fixtures import make_cifar10

    from train import finetune

    root, server = bucket
    _tiny_npz(root / "imagenet21k" / "testing.npz", num_classes=21843)
    make_cifar10(str(tmp_path / "data"), n_train=32, n_test=16)
    monkeypatch.chdir(tmp_path)
    argv = ["--pretrained_dir", "i21k:testing", "--data_dir", "data", "--img_size", "32", "--train_batch_size", "8",
            "--num_steps", "2", "--eval_every", "2", "--warmup_steps", "1", "--no_progress", "--device", "cpu"]
    assert finetune.main([*argv, "--name", "a"]) == 0
    assert "loaded checkpoint/testing.npz: loaded" in capsys.readouterr().err
    assert finetune.main([*argv, "--name", "b"]) == 0  # the file is there now: used, not fetched again
    assert server.requests == ["/imagenet21k/testing.npz"]
    assert os.listdir(tmp_path / "checkpoint") == ["testing.npz"]
    # A mistyped file is refused (exit 2, one line), never downloaded into that name.
    capsys.readouterr()
    typo = ["--pretrained_dir", "checkpoint/testing.npzz", "--model_type", "testing"]
    assert finetune.main([*argv, "--name", "c", *typo]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.finetune: error: checkpoint/testing.npzz does not exist") and "\n" not in err
    assert server.requests == ["/imagenet21k/testing.npz"] and os.listdir(tmp_path / "checkpoint") == ["testing.npz"]
