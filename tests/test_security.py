"""The app as a public service, tried as anyone on the internet can: raw HTTP to every event by fn_index (page
events marked private included), hostile values in every field, and the bounds on disk, uploads and the queue."""
import inspect
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from explorer.inputs import DEFAULTS, FIELDS
from server.api import Api
from server.files import FileStore
from server.guard import BAD_PATH, BUSY, NOT_A_FILE, REMOTE, TOO_DEEP
from server.guard import FOREIGN as FOREIGN_FILE
from server.page import ANALYSIS_OUTPUTS, STALE_OUTPUTS, VIEW_OUTPUTS
from tests.helpers import tiny_loaded
from tests.served import RawClient, served_app

pytestmark = pytest.mark.slow  # starts the app, a browser or a fresh process, or runs the default model

ROOT = Path(__file__).resolve().parents[1]
SERVER_IMAGE = ROOT / "docs" / "screenshot.png"  # an image on the server that no visitor uploaded
CAT = ROOT / "assets" / "chelsea.png"
RES = 224
IMAGE_ENDPOINTS = ("cls_attention", "patch_attention", "rollout", "attention_flow", "head_statistics",
                   "hidden_states", "layer_animation", "export", "predict", "relevance", "zero_shot", "faithfulness")


def args(endpoint: str, **values) -> list:
    """Every argument after the image, as a raw client must send them: the defaults, resolution RES, x = y = 10."""
    params = list(inspect.signature(getattr(Api, endpoint)).parameters.values())[2:]
    defaults = {p.name: p.default for p in params} | {"resolution": RES, "x": 10.0, "y": 10.0,
                                                       "prompts": "a photo of a cat"} | values
    return [defaults[p.name] for p in params]
LEAKS = ("Traceback", "TypeError", "ValueError", "KeyError", "Exception", str(ROOT), "/tmp/")


@pytest.fixture(scope="module")
def workspace():
    return app.workspace_for(tiny_loaded(), "cpu")


@pytest.fixture(scope="module")
def client(workspace):
    with served_app(workspace=workspace, queue_size=2) as url:
        yield RawClient(url)


def page_analyze(client: RawClient, image) -> list:
    """The page's analysis event as the page sends it: the image, its settings, then every control."""
    return [image, RES, "default", "float32", *(DEFAULTS[name] for name in FIELDS)]


def folder_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def assert_plain(message: str) -> None:
    assert message and not any(leak in message for leak in LEAKS), message


FOREIGN = {
    "a path string": str(SERVER_IMAGE),
    "a dict without Gradio's meta": {"path": str(SERVER_IMAGE)},
    "a path outside the upload folder": {"path": str(SERVER_IMAGE), "meta": {"_type": "gradio.FileData"}},
    "a path that climbs out of it": {"path": f"{app.gr.utils.get_upload_folder()}/../../{SERVER_IMAGE}",
                                     "meta": {"_type": "gradio.FileData"}},
}


@pytest.mark.parametrize("endpoint", IMAGE_ENDPOINTS)
@pytest.mark.parametrize("kind", FOREIGN)
def test_image_endpoints_read_only_uploads(client, endpoint, kind):
    result = client.call(endpoint, [FOREIGN[kind], *args(endpoint)])
    assert not result.success and result.data is None
    if kind == "a path string":
        assert result.error == "image: send an image file as an upload (gradio_client: handle_file(...)); paths, " \
                               "URLs and other references are not accepted."
    else:  # refused at the door, before Gradio would answer with an empty error
        assert result.status == 422 and result.error == FOREIGN_FILE


@pytest.mark.parametrize("kind", FOREIGN)
def test_the_page_analysis_event_reads_only_uploads(client, kind):
    result = client.call("analyze", page_analyze(client, FOREIGN[kind]))
    assert result.status == 422 and result.error == (NOT_A_FILE if kind == "a path string" else FOREIGN_FILE)


def test_the_page_answers_a_bad_upload_with_a_message_and_clears_its_views(client, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"not an image at all")
    result = client.call("analyze", page_analyze(client, client.upload(fake)))
    assert result.success and "Could not analyse this image" in result.data[1]
    assert result.warnings == ["The file is not a readable image (it may be corrupt or of an unsupported format)."]
    cleared = client.call("clear_stale", [])  # what the page runs after every analysis
    assert cleared.success
    views = {**dict(zip(STALE_OUTPUTS, cleared.data)), **dict(zip(ANALYSIS_OUTPUTS, result.data))}
    drawn = [name for name in VIEW_OUTPUTS if name != "table" and (views[name] or {}).get("value", views[name])]
    assert drawn == [] and views["view"] is None  # nothing from this file, nor from the last image


def test_remote_urls_are_never_fetched(client):
    remote = {"path": "https://example.com/cat.png", "meta": {"_type": "gradio.FileData"}}
    for event, data in (("cls_attention", [remote, *args("cls_attention")]), ("analyze", page_analyze(client, remote))):
        result = client.call(event, data)
        assert result.status == 422 and result.error == REMOTE


def test_uploads_and_examples_are_accepted(client):
    upload = client.upload(CAT)
    result = client.call("cls_attention", [upload, *args("cls_attention")])
    assert result.success and result.data[2]["grid_h"] == 19
    example = {"path": str(CAT), "meta": {"_type": "gradio.FileData"}}  # the page's examples, served from assets/
    assert client.call("cls_attention", [example, *args("cls_attention")]).success


def join(client: RawClient, body: bytes) -> tuple[int, float]:
    """(status, seconds) of a raw POST to the queue."""
    start = time.perf_counter()
    answer = client.http.post(f"{client.url}/gradio_api/queue/join", content=body,
                              headers={"content-type": "application/json"})
    return answer.status_code, time.perf_counter() - start


def file_body(client: RawClient, path) -> bytes:
    return json.dumps({"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, *args("cls_attention")],
                       "fn_index": client.fn_index("cls_attention"), "session_hash": "odd-path"}).encode()


def test_a_path_that_is_slow_to_normalise_is_refused_at_once_and_the_server_keeps_serving(client):
    """realpath("/x/" + "a/../" * 200000) took ~8 s on the event loop: every other request waited."""
    body = file_body(client, "/x/" + "a/../" * 200_000)  # just under the 1 MB cap
    assert client.call("cls_attention", [], body=body).error == BAD_PATH
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(join(client, body))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the bodies are on their way
    start = time.perf_counter()
    assert client.http.get(f"{client.url}/config").status_code == 200
    config_s = time.perf_counter() - start
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [422] * 3
    assert max(seconds for _, seconds in answers) < 1.0 and config_s < 1.0, (answers, config_s)


@pytest.mark.parametrize("path", ["/tmp/a\0b.png", "/tmp/\ud800.png", ["/tmp/a.png"], 7, "/tmp/" + "a" * 6000])
def test_paths_that_are_not_plain_text_get_a_plain_refusal(client, path):
    result = client.call("cls_attention", [], body=file_body(client, path))
    assert result.status == 422 and result.error == BAD_PATH


def test_json_nested_too_deeply_gets_a_plain_refusal(client):
    body = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b', "fn_index": 0, "session_hash": "deep"}'
    answer = client.http.post(f"{client.url}/gradio_api/queue/join", content=body,
                              headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json() == {"detail": TOO_DEEP}


def test_gradio_client_shows_the_refusal_of_a_url(client):
    from gradio_client import Client, handle_file
    with pytest.raises(Exception, match="URLs are not fetched by this server"):
        Client(client.url, verbose=False).predict(handle_file("https://example.com/cat.png"),
                                                  *args("cls_attention"), api_name="/cls_attention")


WRONG = [  # (endpoint, a wrong argument, what the message must say)
    ("cls_attention", {"resolution": "abc"}, "resolution must be a whole number from 224 to 2048, got 'abc'"),
    ("cls_attention", {"layer": None}, "layer must be a whole number from -3 to 2, got None"),
    ("cls_attention", {"opacity": 7}, "opacity must be a number from 0 to 1, got 7"),
    ("cls_attention", {"colormap": "flag"}, "colormap must be one of inferno"),
    ("cls_attention", {"head": [1]}, "head must be one of mean, max, min or a head index from 0 to 3, got [1]"),
    ("patch_attention", {"x": "abc"}, "x must be a number from 0 to 451, got 'abc'"),
    ("patch_attention", {"y": 1e9}, "y must be a number from 0 to 300, got 1000000000.0"),
    ("rollout", {"discard_ratio": 1.5}, "discard ratio must be a number from 0 to 0.99, got 1.5"),
    ("rollout", {"fusion": "sum"}, "fusion must be one of mean, max, min; got 'sum'"),
    ("head_statistics", {"queries": "some"}, "statistics must be one of spread, all; got 'some'"),
    ("layer_animation", {"mode": "video"}, "mode must be one of cls, rollout; got 'video'"),
    ("export", {"model": {"x": 1}}, "model must be 'default' or a model id"),
    ("relevance", {"target": ["/etc/passwd"]}, "target must be text of at most 60 characters"),
    ("relevance", {"method": 3}, "method must be one of relevance, grad_rollout, rollout, attention"),
]


@pytest.mark.parametrize("endpoint, wrong, message", WRONG)
def test_wrong_types_and_values_get_plain_messages(client, endpoint, wrong, message):
    result = client.call(endpoint, [client.upload(CAT), *args(endpoint, **wrong)])
    assert not result.success and message in result.error, result.error
    assert_plain(result.error)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_name(client, literal):
    upload = client.upload(CAT)
    session = "nan-" + literal
    rest = json.dumps(args("cls_attention", resolution="RES"))[1:-1].replace('"RES"', literal)
    body = ('{"data": [%s, %s], "fn_index": %d, "session_hash": "%s"}'
            % (json.dumps(upload), rest, client.fn_index("cls_attention"), session)).encode()
    result = client.call("cls_attention", [], body=body)
    assert not result.success and "resolution must be a whole number from 224 to 2048" in result.error


def test_page_events_check_their_values_too(client):
    session = "page-events"
    analysed = client.call("analyze", page_analyze(client, client.upload(CAT)), session=session)
    assert analysed.success and "grid 19×28" in analysed.data[1]
    # the page's redraw and click, sent by hand with nonsense: the view state is the server's (the client sends
    # null for it), the controls and the click are the client's, and are checked
    controls = [DEFAULTS[name] for name in FIELDS]
    result = client.call("render", [None, "cls", *controls], session=session)
    assert result.success and result.data[0]["path"].endswith(".jpeg")  # the view of this session, drawn
    for name, wrong, message in (("layer", "abc", "layer must be a whole number from -3 to 2, got 'abc'"),
                                 ("cmap", "flag", "colormap must be one of"),
                                 ("mass", 7, "mass fraction must be a number from 0.05 to 1, got 7")):
        bad = [wrong if field == name else value for field, value in zip(FIELDS, controls)]
        bad[FIELDS.index("mass_on")] = True
        refused = client.call("render", [None, "cls", *bad], session=session)
        assert not refused.success and message in refused.error, refused.error
        assert_plain(refused.error)
    clicked = client.call("click", [None], event_data={"index": ["x", None], "value": None}, session=session)
    assert not clicked.success and "click x must be a number" in clicked.error


def test_upload_size_is_capped(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (51 * 2**20))
    answer = client.http.post(f"{client.url}/gradio_api/upload", files={"files": ("big.png", big.open("rb"))})
    assert answer.status_code == 413


def test_request_bodies_are_capped(client):
    body = json.dumps({"data": ["x" * (2 * 2**20)], "fn_index": 0, "session_hash": "big"}).encode()
    answer = client.http.post(f"{client.url}/gradio_api/queue/join", content=body,
                              headers={"content-type": "application/json"})
    assert answer.status_code == 413


def test_a_full_queue_says_busy(client, workspace):
    upload = client.upload(CAT)
    with workspace._device:  # the one model slot stays busy: jobs wait in the queue (size 2)
        threads = [threading.Thread(target=client.call,
                                    args=("rollout", [upload, *args("rollout", resolution=300 + 8 * i)]))
                   for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.5)
        refused = client.call("rollout", [upload, *args("rollout", resolution=RES + 8)])
    for thread in threads:
        thread.join()
    assert refused.status == 503 and refused.error == BUSY


def test_queued_jobs_of_clients_gone_are_dropped(client, workspace):
    upload = client.upload(CAT)
    blocker = threading.Thread(target=client.call, args=("rollout", [upload, *args("rollout", resolution=232)]))
    with workspace._device:
        blocker.start()
        time.sleep(0.5)
        session = "gone"
        joined = client.http.post(f"{client.url}/gradio_api/queue/join", json={
            "data": [upload, *args("rollout", resolution=240)], "fn_index": client.fn_index("rollout"),
            "session_hash": session})
        assert joined.status_code == 200
        with client.http.stream("GET", f"{client.url}/gradio_api/queue/data", params={"session_hash": session}):
            pass  # the client reads nothing and goes away
        time.sleep(3)
    blocker.join()
    time.sleep(2)
    scene = workspace.scene(upload["path"])
    assert workspace.cache.get(("analysis", workspace.key(scene, 232))) is not None
    assert workspace.cache.get(("analysis", workspace.key(scene, 240))) is None  # never computed


def test_identical_requests_reuse_their_files(client, workspace):
    upload = client.upload(CAT)
    root = workspace.files.root
    before = folder_bytes(root)
    paths = {client.call("layer_animation", [upload, *args("layer_animation")]).data[0]["path"] for _ in range(10)}
    assert len(paths) == 1 and folder_bytes(root) - before <= 2 * 2**20
    assert Path(paths.pop()).is_relative_to(root)


def test_file_store_keeps_to_its_size_and_age(tmp_path):
    store = FileStore(tmp_path, max_bytes=10_000, max_age_s=3600)
    first = store.put(b"a" * 4000, "a.bin")
    assert store.put(b"a" * 4000, "a.bin") == first  # the same content is one file
    store.put(b"b" * 4000, "b.bin")
    store.put(b"c" * 4000, "c.bin")  # over the size limit: the least recently used goes
    assert not first.exists() and folder_bytes(tmp_path) <= 10_000
    old = store.put(b"d" * 10, "d.bin")
    stale = time.time() - 7200
    os.utime(old, (stale, stale))
    store.sweep(force=True)
    assert not old.exists() and folder_bytes(tmp_path) <= 10_000


def test_float_images_with_nan_are_analysed_with_a_warning(client, tmp_path):
    values = np.random.default_rng(0).random((60, 80)).astype(np.float32)
    values[10:20, 10:20] = np.nan
    path = tmp_path / "float.tiff"
    Image.fromarray(values, mode="F").save(path)
    result = client.call("analyze", page_analyze(client, client.upload(path)))
    assert result.success and "grid" in result.data[1]
    assert any("100 pixels were NaN or infinite" in w for w in result.warnings)


def test_endpoints_asking_about_one_new_image_at_once_compute_it_once(client, monkeypatch, tmp_path):
    """Three at once: this server's queue holds two besides the one running."""
    from server import workspace as workspace_module
    calls, original = [], workspace_module.analyze
    monkeypatch.setattr(workspace_module, "analyze", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    image = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(image)
    upload = client.upload(image)
    endpoints = ("cls_attention", "rollout", "hidden_states")
    results = {}
    threads = [threading.Thread(target=lambda e=e: results.update({e: client.call(e, [upload, *args(e)])}))
               for e in endpoints]
    threads[0].start()
    deadline = time.time() + 60
    while not calls and time.time() < deadline:  # the first one running: the other two wait in the queue (two
        time.sleep(0.01)  # places), rather than three joining before any has started
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[e].success for e in endpoints), {e: (r.status, r.error) for e, r in results.items()}
    assert calls == [RES]


def test_events_of_the_wrong_shape_get_plain_refusals(client):
    """Item 8: too few values, an example that does not exist, a select event that says nothing selected."""
    upload = client.upload(CAT)
    for data in ([], [upload]):
        result = client.call("cls_attention", data)
        assert result.status == 422 and result.error.startswith("This event takes 7 values; got"), result.error
    examples = next(d["id"] for d in client.config["dependencies"] if d.get("api_name") == "load_example")
    answer = client.http.post(f"{client.url}/gradio_api/run/predict",
                              json={"data": [99], "fn_index": examples, "session_hash": "x"})
    assert answer.status_code == 400 and answer.json()["detail"] == "There is no such example."
    clicked = client.call("click", [None], event_data={"index": [3, 4]})
    assert clicked.status == 422 and clicked.error == "A select event must say what was selected (its index and value)."


def test_uploads_beyond_the_folders_room_are_refused_and_the_folder_stays_under_its_cap(tmp_path):
    """Item 2: uploads count against the disk cap as they arrive; the least recently used files make room first."""
    cap = 8 * 2**20
    workspace = app.workspace_for(tiny_loaded(), "cpu")
    workspace.files.max_bytes = cap
    block = tmp_path / "block.png"
    with served_app(workspace=workspace) as url:
        client = RawClient(url)
        sizes = []
        for i in range(12):
            block.write_bytes(os.urandom(2**20) + bytes([i]))  # distinct 1 MB files
            client.upload(block, f"block{i}.png")
            sizes.append(folder_bytes(workspace.files.root))
        assert max(sizes) <= cap, sizes  # sampled after every upload
        big = tmp_path / "big.png"
        big.write_bytes(os.urandom(9 * 2**20))  # larger than the whole folder may be
        answer = client.http.post(f"{client.url}/gradio_api/upload", files={"files": ("big.png", big.open("rb"))})
        assert answer.status_code == 507 and "no room for uploads" in answer.json()["detail"]
        assert client.call("cls_attention", [client.upload(CAT), *args("cls_attention")]).success


def test_a_model_too_costly_at_this_resolution_is_refused_before_any_resize(client, tmp_path):
    """Item 6: a tiny model with 2-pixel patches at 2048 px is a million tokens; refused at once, naming what fits."""
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=2)
    ViTModel(config).save_pretrained(tmp_path / "tiny-patches")
    started = time.perf_counter()
    result = client.call("cls_attention", [client.upload(CAT), *args("cls_attention", resolution=2048,
                                                                      model=str(tmp_path / "tiny-patches"))])
    assert time.perf_counter() - started < 10
    assert not result.success and "the largest resolution that fits for this image is" in result.error, result.error
    assert client.call("cls_attention", [client.upload(CAT), *args("cls_attention")]).success  # served meanwhile


def test_an_analysis_past_the_time_limit_stops_and_frees_the_slot(tmp_path):
    from server.handlers import open_upload
    from server.settings import Settings
    workspace = app.workspace_for(tiny_loaded(), "cpu", Settings(max_seconds=1e-9))
    folder = Path(workspace.upload_roots[0]) / f"deadline-{time.time_ns()}"
    folder.mkdir(parents=True)
    Image.open(CAT).save(folder / "cat.png")
    image = {"path": str(folder / "cat.png"), "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(Exception, match="stopped after 1e-09 s"):
        open_upload(workspace, image, RES)
    assert workspace._device.acquire(blocking=False)  # the slot is free again
    workspace._device.release()
