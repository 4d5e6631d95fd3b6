"""The Dataset view: its handlers called directly (a zip analysed here, an atlas folder on the server), the zip's caps
each refused plainly, public mode refusing any path, the table sorted by a statistic and the ranked images against
the Parquet itself; then the served app as a raw client calls it."""
import dataclasses
import io
import os
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import app
from analysis import analyze
from explorer.atlas import build_atlas, open_source
from explorer.atlas.archive import ZipCaps
from explorer.inputs import UserError
from model import load_image
from server import dataset
from server.dataset import (NO_FOLDERS, DatasetEvents, HeadChoice, atlas_of, head_table, image_file, open_folder,
                            open_zip)
from server.settings import Settings
from tests.helpers import random_image, tiny_loaded
from tests.served import RawClient, served_app

PX = 224  # the smallest resolution the page offers: the tiny model (patch 8) sees 28 × 28 patches at most
SIZES = {"a.png": (40, 64), "b.png": (64, 48), "photos/c.png": (56, 56), "photos/d.png": (48, 72), "e.png": (64, 64)}
LEAKS = ("Traceback", "Error:", "/tmp/", str(Path(__file__).resolve().parents[1]))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(path: Path, members: dict, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding `members` ({name: bytes}, or a ZipInfo's name and bytes as a pair)."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module", autouse=True)
def private_folder(tmp_path_factory):
    """A managed folder of this module's own: another process's sweep of the shared one cannot take its atlases."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("managed")))
        yield


def settings(**changes) -> Settings:
    return dataclasses.replace(Settings.from_env(), **changes)


@pytest.fixture(scope="module")
def workspace():
    return app.workspace_for(tiny_loaded(), "cpu", settings())


@pytest.fixture
def upload(workspace):
    """A file saved where Gradio keeps uploads, as the file object a client sends."""
    def make(path: Path) -> dict:
        folder = Path(workspace.upload_roots[0]) / f"test-{time.time_ns()}"
        folder.mkdir(parents=True)
        target = folder / path.name
        target.write_bytes(path.read_bytes())
        return {"path": str(target), "meta": {"_type": "gradio.FileData"}}
    return make


@pytest.fixture(scope="module")
def pictures():
    return {name: png(random_image(height, width, seed)) for seed, (name, (height, width)) in enumerate(SIZES.items())}


@pytest.fixture(scope="module")
def opened(workspace, pictures, tmp_path_factory):
    """The zip of five images analysed by the handler, as the page's event does it."""
    path = zip_of(tmp_path_factory.mktemp("zip") / "photos.zip", {**pictures, "notes.txt": b"left out"})
    folder = Path(workspace.upload_roots[0]) / f"test-{time.time_ns()}"
    folder.mkdir(parents=True)
    (folder / "photos.zip").write_bytes(path.read_bytes())
    reported = []
    view = open_zip(workspace, {"path": str(folder / "photos.zip"), "meta": {"_type": "gradio.FileData"}}, "default",
                    PX, lambda fraction, text: reported.append(fraction))
    return view, reported, path


def test_a_zip_is_analysed_as_single_uploads_are(workspace, opened, pictures):
    view, reported, _ = opened
    atlas = atlas_of(workspace, view)
    assert view.uploaded and Path(view.folder).is_relative_to(workspace.files.root)  # in the managed folder
    assert sorted(atlas.images["image"]) == sorted(SIZES) and reported[-1] == 1.0
    loaded = workspace.models.get("default")
    for name, data in pictures.items():
        expected = analyze(loaded, load_image(data), PX).statistics.cls_patch_entropy
        rows = atlas.statistics[atlas.statistics["image"] == name]
        np.testing.assert_array_equal(rows["cls_patch_entropy"].to_numpy().reshape(3, 4), expected)


def test_the_same_zip_again_is_not_analysed_again(workspace, opened, upload, monkeypatch):
    monkeypatch.setattr(dataset, "build_atlas", lambda *a, **k: pytest.fail("analysed again"))
    again = open_zip(workspace, upload(opened[2]), "default", PX)  # the same bytes, uploaded again
    assert again.folder == opened[0].folder


def test_the_table_is_sorted_by_a_statistic_and_holds_its_intervals(workspace, opened):
    view, _, _ = opened
    atlas = atlas_of(workspace, view)
    statistics = pd.read_parquet(Path(view.folder) / "statistics")
    direct = statistics.groupby(["layer", "head"])["mean_distance_px"].mean()
    table = head_table(atlas, "mean_distance_px", "descending")
    column = table["headers"].index("Attention distance, fig. 7 (px): mean")
    shown = [row[column] for row in table["data"]]
    assert shown == sorted(shown, reverse=True) and len(shown) == 12
    for row in table["data"]:
        assert row[column] == pytest.approx(direct[(row[0], row[1])], abs=1e-4)
        assert row[column + 1] > 0  # the half-width of the interval over five images
    ascending = head_table(atlas, "cls_mass", "ascending")
    mass = [row[ascending["headers"].index("Attention to CLS: mean")] for row in ascending["data"]]
    assert mass == sorted(mass)


def test_the_lowest_and_highest_images_of_a_head_are_those_of_the_parquet(workspace, opened):
    view, _, _ = opened
    atlas = atlas_of(workspace, view)
    statistics = pd.read_parquet(Path(view.folder) / "statistics")
    for statistic, layer, head in (("cls_patch_entropy", 2, 1), ("mean_distance", 0, 3)):
        rows = statistics[(statistics["layer"] == layer) & (statistics["head"] == head)]
        order = list(rows.sort_values(statistic)["image"])
        drawn = DatasetEvents._drawn(view, atlas, HeadChoice.parse(atlas, statistic, layer, str(head)))
        assert list(drawn["dataset"].lowest) == order and list(drawn["dataset"].highest) == order[::-1]
        assert [caption.split(" · ")[0] for _, caption in drawn["dataset_lowest"]] == order
        tile = drawn["dataset_lowest"][0][0]
        thumb = atlas.thumbnail(order[0])
        assert tile.size == thumb.size
        painted = layer == atlas.settings["map_layer"]  # maps are kept for the last layer only
        assert (np.abs(np.asarray(tile, float) - np.asarray(thumb, float)).mean() > 5) == painted


def test_a_clicked_image_opens_as_a_copy_in_the_managed_folder(workspace, opened, pictures):
    view, _, _ = opened
    path = Path(image_file(workspace, view, "photos/c.png"))
    assert path.is_relative_to(workspace.files.root) and path.read_bytes() == pictures["photos/c.png"]
    assert not path.is_relative_to(Path(view.folder).parent)  # Gradio may delete what it served
    with pytest.raises(UserError, match="not in the atlas"):
        image_file(workspace, view, "../../etc/passwd")


def test_an_atlas_folder_on_the_server_opens_and_its_images_are_copied_for_the_single_views(workspace, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(("x.png", "y.png")):
        random_image(48, 64, seed).save(images / name)
    build_atlas(open_source(images), tmp_path / "atlas", workspace.models.get("default"), PX, progress=False)
    view = open_folder(workspace, str(tmp_path / "atlas"))
    assert not view.uploaded and len(atlas_of(workspace, view).images) == 2
    copied = Path(image_file(workspace, view, "y.png"))
    assert copied.is_relative_to(workspace.files.root) and copied.read_bytes() == (images / "y.png").read_bytes()
    with pytest.raises(UserError, match="not a folder"):
        open_folder(workspace, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no atlas"):
        open_folder(workspace, str(images))


def test_public_mode_refuses_every_path(tmp_path):
    public = app.workspace_for(tiny_loaded(), "cpu", settings(public=True))
    (tmp_path / "atlas").mkdir()
    for path in (str(tmp_path / "atlas"), str(tmp_path / "missing"), "/etc", "../..", "~"):
        with pytest.raises(UserError) as refused:
            open_folder(public, path)
        assert str(refused.value) == NO_FOLDERS


@pytest.mark.slow  # builds the app twice
def test_public_mode_hides_the_folder_box_and_keeps_the_zip():
    for public in (True, False):
        demo = app.build_demo(workspace=app.workspace_for(tiny_loaded(), "cpu", settings(public=public)))
        by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
        assert by_id["dataset-path"].visible is not public and by_id["dataset-open"].visible is not public
        assert by_id["dataset-zip"].visible is True


def big_png(width: int, height: int) -> bytes:
    return png(Image.new("RGB", (width, height), (40, 90, 200)))


def symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        link = zipfile.ZipInfo("cat.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return path


SMALL = png(random_image(16, 16))
REFUSED = {  # what is sent, the caps, and the message
    "more than 64 images": (lambda p: zip_of(p, {f"{i:03d}.png": SMALL for i in range(65)}), ZipCaps(),
                            "The zip holds 65 images; at most 64 are analysed at once."),
    "a zip over its size": (lambda p: zip_of(p, {"noise.png": os.urandom(300_000)}, zipfile.ZIP_STORED),
                            ZipCaps(max_bytes=200_000), "The zip is 0.3 MB; at most 0.191 MB are accepted."),
    "a member too big": (lambda p: zip_of(p, {"a.png": SMALL, "noise.png": os.urandom(300_000)}),
                         ZipCaps(max_member_bytes=200_000), "noise.png unpacks to 0.3 MB; at most 0.191 MB an image"),
    "too many pixels": (lambda p: zip_of(p, {"wide.png": big_png(5000, 4000)}, zipfile.ZIP_STORED), ZipCaps(),
                        "wide.png is 5000×4000 px (20.0 MP); at most 16.8 MP an image are accepted in a zip."),
    "a path escaping": (lambda p: zip_of(p, {"a.png": SMALL, "../../escape.png": SMALL}), ZipCaps(),
                        "../../escape.png: a path that leaves the archive's folder is not accepted."),
    "an absolute path": (lambda p: zip_of(p, {"/etc/cron.d/x.png": SMALL}), ZipCaps(),
                         "a path that leaves the archive's folder"),
    "a link": (symlink_zip, ZipCaps(), "cat.png: links are not accepted in a zip."),
    "a zip bomb": (lambda p: zip_of(p, {"bomb.png": bytes(5_000_000)}), ZipCaps(), "times its packed size"),
    "too many entries": (lambda p: zip_of(p, {f"d{i}/": b"" for i in range(1100)}), ZipCaps(),
                         "The zip lists 1,100 entries; at most 1,024 are accepted."),
    "not a zip": (lambda p: p.write_bytes(SMALL) and p, ZipCaps(), "The file is not a zip archive."),
    "no image": (lambda p: zip_of(p, {"notes.txt": b"words"}), ZipCaps(), "The zip holds no images"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_the_zip_caps_refuse_plainly_and_unpack_nothing(case, tmp_path, upload):
    make, caps, message = REFUSED[case]
    ws = app.workspace_for(tiny_loaded(), "cpu", settings(zip_caps=caps))
    before = set(ws.files.root.glob("vit-inspect/dataset-*"))
    sent = upload(make(tmp_path / "sent.zip"))
    with pytest.raises(UserError) as refused:
        open_zip(ws, sent, "default", PX)
    assert message in str(refused.value) and not any(leak in str(refused.value) for leak in LEAKS)
    assert set(ws.files.root.glob("vit-inspect/dataset-*")) == before
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/etc/cron.d/x.png").exists()


def test_only_an_upload_is_taken_as_a_zip(workspace, tmp_path):
    path = zip_of(tmp_path / "elsewhere.zip", {"a.png": SMALL})
    for value in (str(path), {"path": str(path)}, {"path": str(path), "meta": {"_type": "gradio.FileData"}}):
        with pytest.raises(UserError, match="zip: "):
            open_zip(workspace, value, "default", PX)


@pytest.mark.slow  # starts the app
def test_the_served_page_events(pictures, tmp_path):
    workspace = app.workspace_for(tiny_loaded(), "cpu", settings())
    sent = zip_of(tmp_path / "photos.zip", pictures)
    with served_app(workspace=workspace) as url:
        client = RawClient(url)
        session = "dataset-session"
        opened = client.call("open_zip", [client.upload(sent), None, PX, "cls_patch_entropy", "ascending"],
                             session=session)
        assert opened.success, opened.error
        assert opened.data[1].startswith("**5 images**"), opened.data[1]
        lowest = [item["image"]["path"] for item in opened.data[7]]
        assert len(lowest) == 5
        picked = client.call("open_lowest", [None], event_data={"index": 2, "value": None}, session=session)
        assert picked.success, picked.error
        assert Path(picked.data[0]["path"]).read_bytes() in pictures.values()  # the image itself, to analyse
        rendered = client.call("redraw", [None, "mean_distance_px", 1, "2", "descending"], session=session)
        assert rendered.success and len(rendered.data[2]["data"]) == 12

        refused = client.call("open_zip", [client.upload(tmp_path / "photos.zip", "x.zip") | {
            "path": str(tmp_path / "photos.zip")}, None, PX, "cls_patch_entropy", "ascending"])
        assert refused.status == 422 and "uploaded to this server" in refused.error  # a path outside the uploads
        junk = tmp_path / "junk.zip"
        junk.write_bytes(b"not a zip at all")
        answer = client.call("open_zip", [client.upload(junk), None, PX, "cls_patch_entropy", "ascending"])
        assert answer.success and "The file is not a zip archive." in answer.data[1]
        assert not any(leak in answer.data[1] for leak in LEAKS)
        folder = client.call("open_folder", [str(tmp_path), "cls_patch_entropy", "ascending"])
        assert folder.success and "holds no atlas" in folder.data[1]
    public = app.workspace_for(tiny_loaded(), "cpu", settings(public=True))
    with served_app(workspace=public) as url:
        client = RawClient(url)
        folder = client.call("open_folder", [str(tmp_path), "cls_patch_entropy", "ascending"])
        assert folder.success and NO_FOLDERS in folder.data[1]


def test_a_zip_gets_the_time_of_one_analysis_in_all(pictures, tmp_path, upload):
    ws = app.workspace_for(tiny_loaded(), "cpu", settings(max_seconds=1e-9))
    with pytest.raises(UserError, match="None of the zip's images could be analysed .*stopped after 1e-09 s"):
        open_zip(ws, upload(zip_of(tmp_path / "slow.zip", pictures)), "default", PX)
    assert ws.device_slot().acquire(blocking=False)  # the slot is free again
    ws.device_slot().release()
