"""``cryoem explore``: the server's API against independent computations, its refusals, and the page in a real
headless Chromium (selenium + Debian's ``chromium`` / ``chromium-driver``; skipped with a message without them).

The browser test stores a screenshot at ``$PLATO_ARTIFACTS/explore.png`` (default ``out/test-artifacts/``).
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.cryoem.tiny import BIN, cryoem, simulate_ubiquitin, star_as_cs, train_tiny

ROOT = Path(__file__).resolve().parents[2]
N_PARTICLES, N_CA = 120, 76  # 1UBI: 76 residues, one C-alpha each


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_ubiquitin(tmp_path_factory.mktemp("sim"), N_PARTICLES, seed=4)


@pytest.fixture(scope="module")
def run(sim, tmp_path_factory):
    out = train_tiny(sim, tmp_path_factory.mktemp("run") / "run", zdim=3)
    r = cryoem("analyze", out, "--k", 3, "--no-snapshots")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def server(run, sim):
    """The app on a free port of 127.0.0.1, in this process."""
    from cryoem.explore import Session
    from cryoem.explore.server import make_server

    srv = make_server(Session(run, colors=(f"{sim / 'ground_truth.npz'}:model_index",)), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    """(status, headers, body) of one raw request (the path is sent as written, ``..`` included)."""
    c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    c.close()
    return out


def latents(run):
    return np.load(run / "analysis" / "latents.npy")


def pdb_atoms(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (M, N, 3) and B-factors (M, N) of a multi-model PDB, parsed by column."""
    models, cur = [], []
    for line in text.splitlines():
        if line.startswith("ATOM"):
            cur.append([float(line[30:38]), float(line[38:46]), float(line[46:54]), float(line[60:66])])
        elif line.startswith("ENDMDL"):
            models.append(cur)
            cur = []
    a = np.asarray(models)
    return a[..., :3], a[..., 3]


def particle_rows(star: Path):
    import starfile

    blocks = starfile.read(star, always_dict=True)
    return next(df for k, df in blocks.items() if "rlnImageName" in df.columns)


# ----------------------------------------------------------------------------- the API, no browser
def test_latents_and_columns_arrive_as_binary_arrays(server, run, sim):
    z = latents(run).astype(np.float64)
    st, hd, body = request(server, "GET", "/api/embedding?axes=pca:1,2")
    assert st == 200 and hd["Content-Type"] == "application/octet-stream"
    xy = np.frombuffer(body, "<f4").reshape(-1, 2)
    zc = z - z.mean(0)
    ref = zc @ np.linalg.svd(zc, full_matrices=False)[2][:2].T  # PCA by SVD, each axis up to its sign
    assert np.allclose(np.abs(xy), np.abs(ref), atol=1e-4)
    st, hd, body = request(server, "GET", "/api/column?name=rlnDefocusU")
    assert st == 200 and json.loads(hd["X-Column"])["kind"] == "continuous"
    assert np.allclose(np.frombuffer(body, "<f4"), particle_rows(sim / "particles.star")["rlnDefocusU"], rtol=1e-6)
    st, hd, body = request(server, "GET", "/api/column?name=k-means%20cluster")
    assert json.loads(hd["X-Column"])["categories"] == [0, 1, 2]
    assert np.array_equal(np.frombuffer(body, "<f4"), np.load(run / "analysis" / "kmeans_labels.npy"))
    st, _, body = request(server, "GET", "/api/column?name=model_index")  # --color FILE.npz:KEY
    assert st == 200 and np.array_equal(np.frombuffer(body, "<f4"),
                                        np.unique(np.load(sim / "ground_truth.npz")["model_index"],
                                                  return_inverse=True)[1])


def blobs(n_per: int, zdim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight Gaussian blobs far apart in latent space: (3 n_per, zdim) float32 latents and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (3, zdim))
    labels = np.repeat(np.arange(3), n_per)
    return (centres[labels] + rng.normal(0, 1, (3 * n_per, zdim))).astype(np.float32), labels


def separated(emb: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every point is nearer its own blob's 2-D centre than any other blob's."""
    centres = np.stack([emb[labels == k].mean(0) for k in np.unique(labels)])
    return bool(np.all(np.linalg.norm(emb[:, None] - centres[None], axis=2).argmin(1) == labels))


@pytest.mark.parametrize("kind", ["umap", "tsne"])
def test_nonlinear_axes_keep_separate_states_apart(kind):
    from cryoem.explore.session import tsne_embedding, umap_embedding

    z, labels = blobs(100)
    emb = (umap_embedding if kind == "umap" else tsne_embedding)(z)
    assert emb.shape == (300, 2) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert separated(emb, labels)


def test_tsne_places_the_unsampled_particles_beside_their_latent_neighbours():
    from cryoem.explore.session import tsne_embedding

    z, labels = blobs(200)
    emb = tsne_embedding(z, sample=150, neighbours=1)  # 450 of 600 particles are placed, not embedded
    assert separated(emb, labels)
    sub = np.sort(np.random.default_rng(0).choice(600, 150, replace=False))
    rest = np.setdiff1d(np.arange(600), sub)
    nearest = sub[np.linalg.norm(z[rest][:, None] - z[sub][None], axis=2).argmin(1)]
    assert np.array_equal(emb[rest], emb[nearest])


def test_nonlinear_axes_are_served_and_kept_in_the_run(server, run):
    for kind in ("umap", "tsne"):
        st, hd, body = request(server, "GET", f"/api/embedding?axes={kind}")
        assert st == 200 and hd["Content-Type"] == "application/octet-stream"
        xy = np.frombuffer(body, "<f4").reshape(-1, 2)
        assert xy.shape == (N_PARTICLES, 2)
        assert np.array_equal(np.load(run / "explore" / f"{kind}.npy"), xy)  # the cache a new session reuses


def test_a_decoded_model_is_cryoem_decode_with_displacement_as_b_factor(server, run, sim, tmp_path):
    from cryoem.structure import read_structure

    i = 7
    np.save(tmp_path / "z.npy", latents(run)[i:i + 1])
    r = cryoem("decode", run, "--z", tmp_path / "z.npy", "--out", tmp_path / "m.pdb")
    assert r.returncode == 0, r.stderr
    ref = read_structure(tmp_path / "m.pdb").coords[0]
    st, _, body = request(server, "GET", f"/api/model?particle={i}")
    assert st == 200
    xyz, b = pdb_atoms(body.decode())
    assert xyz.shape == (1, N_CA, 3) and np.allclose(xyz[0], ref, atol=2e-3)
    start = read_structure(sim / "gt_models.pdb").select("ca").coords[0]  # the run's starting model
    assert np.allclose(b[0], np.linalg.norm(xyz[0] - start, axis=-1), atol=0.02)


def test_twenty_parallel_decodes_all_succeed(server):
    def get(i):
        return request(server, "GET", f"/api/model?particle={i}" if i % 2 else f"/api/map?particle={i}")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(get, range(20)))
    assert [st for st, _, _ in answers] == [200] * 20
    for i, (_, _, body) in enumerate(answers):
        assert body.count(b"\nATOM ") + body.startswith(b"ATOM") == N_CA if i % 2 else len(body) > 32 ** 3 * 4


def test_it_serves_only_its_files_and_refuses_bad_requests(server, run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    (run / "link.txt").symlink_to(secret)
    assert request(server, "GET", "/")[0] == 200
    assert request(server, "GET", "/static/explorer.js")[0] == 200
    assert request(server, "GET", "/run/analysis/pca.png")[0] == 200
    for path in ("/static/../session.py", "/run/../run/config.json", "/run/%2e%2e/x", "/static/..%2f__init__.py",
                 "/run/link.txt", f"/run/{secret}", "/run//etc/passwd", "/static/%5c..%5cx"):
        st, _, body = request(server, "GET", path)
        assert st in (403, 404) and b"not for the page" not in body and b"root:" not in body, path
    bad = [("GET", "/api/model?particle=x", None), ("GET", "/api/model?particle=100000", None),
           ("GET", "/api/model", None), ("GET", "/api/model?z=1,2", None), ("GET", "/api/column?name=nope", None),
           ("GET", "/api/embedding?axes=tsne:9", None), ("GET", "/api/nothing", None),
           ("POST", "/api/mean", b"abc"), ("POST", "/api/selections?name=a", b""),
           ("POST", "/api/selections?name=../x", np.arange(3, dtype="<u4").tobytes()),
           ("POST", "/api/path", b"{not json"), ("POST", "/api/path", b'{"pc": 1, "frames": 1000}'),
           ("GET", "/api/selections/nope", None), ("POST", "/api/meta", b"")]
    for method, path, body in bad:
        st, hd, text = request(server, method, path, body)
        assert 400 <= st < 500 and b"Traceback" not in text and "error" in json.loads(text), (method, path, st)
    assert request(server, "GET", "/api/meta", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    st, _, _ = request(server, "POST", "/api/selections?name=csrf", b"\0\0\0\0",  # another site's page
                       headers={"Origin": "http://evil.example"})
    assert st == 403 and not (run / "explore" / "selections" / "csrf.star").exists()
    for raw in (b"GET / HTTP/1.1 extra words\r\n\r\n", b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"POST /api/mean HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: many\r\n\r\n",
                b"POST /api/mean HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(raw)
            reply = s.recv(65536)
        status = int(reply.split(b"\r\n")[0].split()[1])
        assert reply.startswith(b"HTTP/1.") and 400 <= status < 500 and b"Traceback" not in reply, raw


def test_selection_is_a_subset_of_the_original_star_and_survives_a_new_session(server, run, sim):
    from cryoem.explore import Session

    idx = np.array([3, 0, 17, 42, 99, 17])
    st, _, body = request(server, "POST", "/api/selections?name=api_sel", idx.astype("<u4").tobytes())
    assert st == 201, body
    rec = json.loads(body)
    want = np.unique(idx)
    assert rec["count"] == len(want)
    written = particle_rows(run / rec["subset"])
    source = particle_rows(sim / "particles.star")
    assert written.reset_index(drop=True).equals(source.iloc[want].reset_index(drop=True))
    assert np.array_equal(np.load(run / rec["indices"]), want)
    assert request(server, "POST", "/api/selections?name=api_sel", b"\0\0\0\0")[0] == 409  # names are unique
    st, _, body = request(server, "GET", "/api/selections/api_sel")
    assert np.array_equal(np.frombuffer(body, "<u4"), want)
    assert [s["name"] for s in Session(run).selections()] == ["api_sel"]  # kept in the run folder
    r = cryoem("select", run, "--indices", run / rec["indices"], "--out", run / "via_select.star")
    assert r.returncode == 0, r.stderr  # the same rows as cryoem select writes from the saved indices
    assert (run / "via_select.star").read_bytes() == (run / rec["subset"]).read_bytes()


def test_a_half_set_run_on_a_cs_file_colours_by_half_and_field_and_saves_a_cs_subset(sim, tmp_path):
    from cryoem.explore import Session

    star_as_cs(sim / "particles.star", sim / "orig.cs")
    out = tmp_path / "halves"
    r = cryoem("train", "--particles", sim / "orig.cs", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", 2, "--steps", 2, "--batch-size", 16, "--half-sets", "--out", out)
    assert r.returncode == 0, r.stderr
    assert cryoem("analyze", out, "--k", 2, "--no-snapshots").returncode == 0
    session = Session(out)
    half = np.zeros(N_PARTICLES)
    for h in (1, 2):
        half[json.loads((out / f"half{h}" / "model.json").read_text())["subset"]] = h
    values, info = session.column("half-set")
    assert info["kind"] == "categorical" and np.array_equal(np.asarray(info["categories"])[values.astype(int)], half)
    orig = np.load(sim / "orig.cs")
    values, info = session.column("ctf/df1_A")  # any scalar field of the .cs
    assert info["kind"] == "continuous" and np.array_equal(values, orig["ctf/df1_A"])
    rec = session.save_selection("two", [7, 3])
    sub = np.load(out / rec["subset"])
    assert rec["subset"].endswith(".cs") and sub.dtype == orig.dtype and sub.tobytes() == orig[[3, 7]].tobytes()


def test_a_path_is_a_movie_a_map_series_and_a_chimerax_script(server, run):
    z = latents(run)
    st, _, body = request(server, "POST", "/api/path", json.dumps({"particles": [2, 9], "frames": 5, "name": "p1"}))
    assert st == 201, body
    rec = json.loads(body)
    xyz, _ = pdb_atoms((run / rec["pdb"]).read_text())
    assert xyz.shape == (5, N_CA, 3)
    for frame, i in ((0, 2), (4, 9)):
        end, _ = pdb_atoms(request(server, "GET", "/api/model?z=" + ",".join(map(repr, z[i].tolist())))[2].decode())
        assert np.allclose(xyz[frame], end[0], atol=2e-3)
    assert len(rec["maps"]) == 5 and all((run / m).is_file() for m in rec["maps"])
    cxc = (run / rec["cxc"]).read_text()
    assert "open path.pdb coordsets true" in cxc and "vseries true" in cxc and "map_04.mrc" in cxc


def test_cli_binds_loopback_and_prints_the_url(run):
    import psutil

    p = subprocess.Popen([BIN / "cryoem", "explore", run, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [p.stdout.readline() for _ in range(3)]
        url = next(line.split()[-1] for line in lines if line.startswith("open "))
        assert url.startswith("http://127.0.0.1:") and "ssh -L" in lines[2]
        listening = [c.laddr for c in psutil.Process(p.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening)
    finally:
        p.terminate()
        p.wait(30)
    r = cryoem("explore", run.parent / "missing")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the page in a real browser
def chrome():
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (it is in requirements.lock; run scripts/setup.sh)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium not found: apt-get install chromium chromium-driver (scripts/setup.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950",
              "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"):
        opts.add_argument(a)  # WebGL through SwiftShader: no GPU, no display
    return webdriver.Chrome(options=opts, service=Service(driver))


def wait_for(d, script, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = d.execute_script(script)
        if v:
            return v
        errors = d.execute_script("return window.explorer ? window.explorer.state.errors : []")
        assert not errors, errors
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def isolated_point(xy: np.ndarray) -> int:
    """The particle farthest from its nearest neighbour on these axes (a click on it hits it alone)."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return int(np.argmax(d.min(1) - 0.05 * np.linalg.norm(xy - np.median(xy, 0), axis=1)))


def gap_bounds(v: np.ndarray, qa: float, qb: float) -> tuple[float, float]:
    """Two thresholds near the qa / qb quantiles of v, each halfway between neighbouring values (no point on them)."""
    s = np.sort(v)
    ia, ib = int(qa * len(s)), int(qb * len(s))
    return float(s[ia] + s[ia + 1]) / 2, float(s[ib] + s[ib + 1]) / 2


def wide_gaps(v: np.ndarray, qa: float, qb: float) -> tuple[float, float]:
    """Two thresholds, each in the middle of the widest gap between neighbouring values of v within 0.1 of the
    qa / qb quantiles: far from every point, for a selection drawn with the mouse in whole pixels."""
    s = np.sort(v)

    def widest(q: float) -> float:
        lo, hi = int((q - 0.1) * len(s)), int((q + 0.1) * len(s))
        k = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
        return float(s[k] + s[k + 1]) / 2

    return widest(qa), widest(qb)


def test_the_page_draws_every_particle_decodes_a_click_and_saves_a_lasso_and_a_box(server, run, sim):
    from matplotlib.path import Path as Polygon
    from selenium.webdriver.common.action_chains import ActionChains

    d = chrome()
    try:
        d.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait_for(d, "return document.body.dataset.ready === '1'")
        n = len(latents(run))
        assert d.execute_script("return window.explorer.drawnPoints()") == n

        xy = np.frombuffer(request(server, "GET", "/api/embedding?axes=pca:1,2")[2], "<f4").reshape(-1, 2)
        i = isolated_point(xy.astype(np.float64))
        x, y = d.execute_script(f"return window.explorer.pointToScreen({i})")
        canvas = d.find_element("id", "scatter")
        r = canvas.rect
        ActionChains(d).move_to_element_with_offset(canvas, x - r["x"] - r["width"] / 2,
                                                    y - r["y"] - r["height"] / 2).click().perform()
        model = wait_for(d, "const m = window.explorer.state.lastModel; return m && m.label.startsWith('particle') "
                            "&& m")
        assert model["label"] == f"particle {i}" and model["atoms"] == N_CA
        d.find_element("id", "show-map").click()  # its density map, an isosurface in the same viewer
        assert wait_for(d, "const m = window.explorer.state.map; return m && [m.volume.nx, m.volume.ny, "
                           "m.volume.nz]") == [32, 32, 32]  # the particles' box
        d.find_element("id", "path-pc1").click()  # a movie along latent PC1
        movie = wait_for(d, "const m = window.explorer.state.movie; return m && m.frame > 1 && "
                            "{frames: m.frames, atoms: window.explorer.state.lastModel.atoms}")
        assert movie == {"frames": 20, "atoms": N_CA}

        (x0, x1), (y0, y1) = gap_bounds(xy[:, 0], 0.2, 0.8), gap_bounds(xy[:, 1], 0.1, 0.9)
        poly = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        want = np.flatnonzero(Polygon(poly).contains_points(xy.astype(np.float64)))
        d.execute_script(f"window.explorer.lasso({json.dumps(poly)})")
        got = wait_for(d, "const s = window.explorer.state.selection; return s.length > 1 && s")
        assert sorted(got) == want.tolist()
        wait_for(d, "const m = window.explorer.state.lastModel; return m && m.label.startsWith('mean')")
        rec = d.execute_async_script("const done = arguments[0]; window.explorer.saveSelection('lassoed')"
                                     ".then(done, (e) => done({error: e.message}))")
        assert "error" not in rec, rec
        written = particle_rows(run / rec["subset"])
        source = particle_rows(sim / "particles.star")
        assert written.reset_index(drop=True).equals(source.iloc[want].reset_index(drop=True))

        (x0, x1), (y0, y1) = wide_gaps(xy[:, 0], 0.1, 0.6), wide_gaps(xy[:, 1], 0.3, 0.9)  # mouse: whole pixels
        want = np.flatnonzero((xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1))
        d.find_element("css selector", "[data-mode=box]").click()  # a box dragged with the mouse
        (ax, ay), (bx, by) = (d.execute_script(f"return window.explorer.dataToScreen({u}, {v})")
                              for u, v in ((x0, y1), (x1, y0)))
        ActionChains(d).move_to_element_with_offset(canvas, ax - r["x"] - r["width"] / 2,
                                                    ay - r["y"] - r["height"] / 2).click_and_hold().pause(0.2) \
            .move_by_offset(1, 0).pause(0.2).move_by_offset(-1, 0).pause(0.2) \
            .move_by_offset(bx - ax, by - ay).pause(0.2).release().perform()  # as a hand: small moves first, slowly
        got = wait_for(d, f"const s = window.explorer.state.selection; return s.length === {len(want)} && s")
        assert sorted(got) == want.tolist()

        art = Path(os.environ.get("PLATO_ARTIFACTS", ROOT / "out" / "test-artifacts"))
        art.mkdir(parents=True, exist_ok=True)
        time.sleep(1.0)  # let NGL finish its frame
        assert d.save_screenshot(str(art / "explore.png"))

        d.refresh()  # saved selections are the run folder's, not the page's
        wait_for(d, "return document.body.dataset.ready === '1'")
        assert "lassoed" in d.find_element("id", "sel-list").text
    finally:
        d.quit()


def test_analyze_report_is_a_table_with_the_explore_command(run):
    html = (run / "analysis" / "index.html").read_text()
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    labels = np.load(run / "analysis" / "kmeans_labels.npy")
    assert summary["particles"] == len(latents(run)) == N_PARTICLES
    assert summary["cluster_sizes"] == np.bincount(labels).tolist()
    assert "<table>" in html and f"<td>{N_PARTICLES:,}</td>" in html
    assert f"cryoem explore {run.resolve()}" in html and "ssh -L 8050:127.0.0.1:8050" in html


def test_pca_matches_scikit_learn_signs_included():
    from sklearn.decomposition import PCA

    from cryoem.analyze import pca

    z = (np.random.default_rng(1).standard_normal((2000, 6)) @ np.random.default_rng(2).standard_normal((6, 6)))
    scores, p = pca(z.astype(np.float32), 3)
    ref = PCA(3).fit(z)
    assert np.allclose(p.components_, ref.components_, atol=1e-5)
    assert np.allclose(p.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-5)
    assert np.allclose(scores, ref.transform(z), atol=1e-4)
