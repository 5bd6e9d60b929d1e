"""The try-it page at GET /, in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver (`make chromium`), against the real stack.

Each test uses the page as a person would (the file input, the keyboard, the sample buttons) and checks what they
would see against what the API itself answers for the same bytes. Screenshots at desktop and phone width are saved
in the test's temporary folder; with SEGAPP_SCREENSHOTS=docs/images they replace the README's pictures.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "web" / "samples"
# A test run leaves the checkout as it was: screenshots go to docs/images/ only when asked.
SCREENSHOTS = Path(os.environ.get("SEGAPP_SCREENSHOTS") or tempfile.mkdtemp(prefix="segapp-screenshots-"))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# Headless as root in a container: no sandbox (it needs user namespaces), no GPU, /tmp instead of a small
# /dev/shm, and none of the background traffic a browser starts on its own (nothing outside can be reached here).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
DESKTOP, PHONE = (1280, 900), (375, 812)  # CSS pixels of the viewport
WAIT_S = 60


@pytest.fixture(scope="module")
def downloads():
    path = Path(tempfile.mkdtemp(prefix="segapp-downloads-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def chromium(downloads: Path | None = None):
    """A headless Chromium with a fresh profile, its console kept for `console_errors`; files it downloads go to
    `downloads` when given. Quit and its profile removed afterwards."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium and chromedriver are not installed: run `make chromium`")
    profile = Path(tempfile.mkdtemp(prefix="segapp-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads), "download.prompt_for_download": False,
        })
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    if downloads:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(downloads):
    """One headless Chromium for the module, downloading into `downloads`."""
    with chromium(downloads) as driver:
        yield driver


def console_errors(driver) -> list[dict]:
    """The console's errors since the last call (the browser's own network messages included)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def emulate(driver, size: tuple[int, int], phone: bool) -> None:
    """A viewport of `size`; a phone's is a mobile one with a touch screen (`pointer: coarse`)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": phone,
    })
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": phone, "maxTouchPoints": 5})


def open_page(driver, stack, size, phone: bool = False) -> None:
    emulate(driver, size, phone)
    driver.get(stack.url + "/")
    wait_for(driver, lambda d: d.find_element(By.ID, "model").text.startswith("Model "), "the model card")


def wait_for(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        shown = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{what} did not show within {WAIT_S} s; the page shows:\n{shown}") from None


def wait_segmented(driver, name: str) -> None:
    wait_for(driver, lambda d: d.find_element(By.ID, "status").text == f"{name} segmented."
             or d.find_element(By.ID, "error").is_displayed(), f"the mask of {name}")
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert driver.find_element(By.ID, "overlay").is_displayed()


def wait_cutout(driver):
    """The cutout's image, once the page has shown it and its download link."""
    return wait_for(driver, lambda d: d.execute_script(
        "const image = document.getElementById('cutout');"
        "return image.complete && image.naturalWidth > 0 && !document.getElementById('cutout-download').hidden"
        " ? image : null;"), "the cutout")


def shown_error(name: str):
    """A wait condition: the error box, once it is shown and names `name`."""
    def condition(driver):
        error = driver.find_element(By.ID, "error")
        return error if error.is_displayed() and name in error.text else False
    return condition


def canvas_pixels(driver, element_id: str) -> np.ndarray:
    """The RGB pixels of a canvas on the page, at its own size."""
    url = driver.execute_script(f"return document.getElementById('{element_id}').toDataURL('image/png');")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def served_models(stack) -> dict:
    """GET /v1/models: the default model's name, and every model by name."""
    answer = stack.request("GET", "/v1/models")
    assert answer.status == 200, answer.body[:300]
    listing = answer.json()
    return {"default": listing["default_model"], "models": {model["name"]: model for model in listing["models"]}}


def download(driver, link_id: str, folder: Path, name: str) -> bytes:
    """Click the link (an a[download] to a blob: URL made by the page) and return the file the browser saved."""
    link = driver.find_element(By.ID, link_id)
    assert link.get_attribute("download") == name and link.get_attribute("href").startswith("blob:")
    link.click()
    saved = folder / name
    deadline = time.monotonic() + WAIT_S
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.exists(), f"{name} was not downloaded into {folder}"
    return saved.read_bytes()


def save_screenshot(driver, name: str, size: tuple[int, int], phone: bool = False) -> Path:
    """The whole page at the viewport's width, as a small palette PNG in SCREENSHOTS."""
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    emulate(driver, (size[0], driver.execute_script("return document.documentElement.scrollHeight;")), phone)
    png = driver.get_screenshot_as_png()
    emulate(driver, size, phone)
    path = SCREENSHOTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(png)) as shot:
        rgb = shot.convert("RGB")
    # The README's pictures stay under 200 KB: fewer colours until it fits (128 keep the photos' look).
    for colours in (128, 64, 32):
        rgb.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < 200_000:
            break
    return path


def test_an_uploaded_jpeg_shows_its_mask_legend_timings_and_download(browser, stack, downloads):
    photo = SAMPLES / "scene-0.jpg"
    data = photo.read_bytes()
    expected = stack.infer(data, "?format=json").json()
    card = stack.request("GET", "/v1/model").json()
    png = stack.infer(data)
    assert png.status == 200

    open_page(browser, stack, DESKTOP)
    assert "trained on synthetic scenes" in browser.find_element(By.ID, "trained").text
    model = browser.find_element(By.ID, "model").text
    assert f"{card['name']} {card['version']}" in model
    assert f"mIoU {card['quality']['miou']:.3f}" in model
    assert not browser.find_element(By.CSS_SELECTOR, "label.camera").is_displayed()  # a phone's, not a desktop's
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_segmented(browser, photo.name)

    # Every view at the image's own size; the API's answer says which.
    size = (expected["width"], expected["height"])
    for canvas in ("overlay", "mask"):
        element = browser.find_element(By.ID, canvas)
        assert (int(element.get_attribute("width")), int(element.get_attribute("height"))) == size
    shown = browser.find_element(By.ID, "input")
    assert (int(shown.get_property("naturalWidth")), int(shown.get_property("naturalHeight"))) == size

    # The mask alone: each pixel in its class's colour from the card, read from the PNG's class indices.
    with Image.open(io.BytesIO(png.body)) as mask_image:
        classes = np.asarray(mask_image)
    palette = np.array(card["palette"], dtype=np.uint8)
    assert np.array_equal(canvas_pixels(browser, "mask"), palette[classes])

    # The opacity slider, by keyboard: at 100 % the overlay is the mask; at 0 % none of the mask's colours is left.
    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.END)
    assert browser.find_element(By.ID, "opacity-value").text == "100 %"
    assert np.array_equal(canvas_pixels(browser, "overlay"), palette[classes])
    slider.send_keys(Keys.HOME)
    assert browser.find_element(By.ID, "opacity-value").text == "0 %"
    assert not np.array_equal(canvas_pixels(browser, "overlay"), palette[classes])
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "opacity-value").text == "10 %"
    for _ in range(4):
        slider.send_keys(Keys.PAGE_UP)
    assert browser.find_element(By.ID, "opacity-value").text == "50 %"

    # The legend: the card's classes in order, each with the share /infer?format=json gives.
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == card["classes"] == expected["classes"]
    for row, name in zip(rows, expected["classes"], strict=True):
        share = row.find_elements(By.TAG_NAME, "td")[2]
        assert float(share.get_attribute("data-fraction")) == expected["fractions"][name]
        assert abs(float(share.text.removesuffix(" %")) - 100 * expected["fractions"][name]) <= 0.005 + 1e-9
        swatch = row.find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color")
        colour = card["palette"][card["classes"].index(name)]
        rgb = ", ".join(map(str, colour))
        assert swatch in (f"rgba({rgb}, 1)", f"rgb({rgb})")

    stages = [row.find_elements(By.TAG_NAME, "td")[0].text
              for row in browser.find_elements(By.CSS_SELECTOR, "#timings tbody tr")]
    assert stages[:5] == ["decode", "infer", "postprocess", "encode", "total"]

    # The download is the PNG mask /infer answers for the same bytes.
    browser.find_element(By.ID, "download").click()
    downloaded = downloads / "scene-0-mask.png"
    deadline = time.monotonic() + WAIT_S
    while not downloaded.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert downloaded.read_bytes() == png.body

    wait_cutout(browser)  # the picture shows the whole page, the cutout included
    assert console_errors(browser) == []
    save_screenshot(browser, "web-desktop.png", DESKTOP)


def test_a_sample_by_keyboard_at_phone_width(browser, stack):
    open_page(browser, stack, PHONE, phone=True)
    camera = browser.find_element(By.CSS_SELECTOR, "label.camera")
    assert camera.is_displayed() and camera.text == "Take a photo…"
    assert browser.find_element(By.ID, "camera").get_attribute("capture") == "environment"
    sample = browser.find_element(By.CSS_SELECTOR, "[data-sample='samples/scene-2.jpg']")
    sample.send_keys(Keys.ENTER)
    wait_segmented(browser, "scene-2.jpg")
    expected = stack.infer((SAMPLES / "scene-2.jpg").read_bytes(), "?format=json").json()
    overlay = browser.find_element(By.ID, "overlay")
    assert int(overlay.get_attribute("width")) == expected["width"]
    # Nothing wider than the phone's screen: no sideways scrolling, the views scaled down to fit.
    width = browser.execute_script("return document.documentElement.clientWidth;")
    assert browser.execute_script("return document.documentElement.scrollWidth;") <= width
    assert 0 < overlay.size["width"] <= width
    shares = [float(cell.get_attribute("data-fraction"))
              for cell in browser.find_elements(By.CSS_SELECTOR, "#legend tbody td:last-child")]
    assert shares == [expected["fractions"][name] for name in expected["classes"]]
    wait_cutout(browser)
    assert console_errors(browser) == []
    save_screenshot(browser, "web-phone.png", PHONE, phone=True)


# A file dropped on the page, or pasted into it, as the browser hands it over: a DataTransfer holding the file.
HAND_OVER = """
const [url, kind, done] = arguments;
fetch(url).then((answer) => answer.blob()).then((blob) => {
  const files = new DataTransfer();
  files.items.add(new File([blob], url.split("/").pop(), {type: "image/jpeg"}));
  const event = kind === "drop" ? new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true})
                                : new ClipboardEvent("paste", {clipboardData: files, bubbles: true, cancelable: true});
  (kind === "drop" ? document.getElementById("drop") : document.body).dispatchEvent(event);
  done(event.defaultPrevented);
});
"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_a_dropped_or_pasted_image_is_segmented(browser, stack, kind):
    expected = stack.infer((SAMPLES / "scene-3.jpg").read_bytes(), "?format=json").json()
    open_page(browser, stack, DESKTOP)
    # Handled by the page: the browser neither opens the file nor pastes it anywhere else.
    assert browser.execute_async_script(HAND_OVER, "samples/scene-3.jpg", kind) is True
    wait_segmented(browser, "scene-3.jpg")
    shares = [float(cell.get_attribute("data-fraction"))
              for cell in browser.find_elements(By.CSS_SELECTOR, "#legend tbody td:last-child")]
    assert shares == [expected["fractions"][name] for name in expected["classes"]]
    assert console_errors(browser) == []


def test_the_picker_lists_the_served_models_and_the_chosen_one_answers(browser, stack):
    served = served_models(stack)
    models, default = served["models"], served["default"]
    ready = [name for name, model in models.items() if model["state"] == "ready"]
    assert default in ready
    open_page(browser, stack, DESKTOP)

    # Every model the server lists, in its order, the default chosen; one that is not ready is shown, with why,
    # and cannot be chosen.
    element = browser.find_element(By.ID, "model-choice")
    assert element.is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "label[for='model-choice']").text == "Model"
    picker = Select(element)
    options = {option.get_attribute("value"): option for option in picker.options}
    assert list(options) == list(models)
    for name, option in options.items():
        assert option.is_enabled() == (name in ready), name
        if name not in ready:
            assert models[name]["reason"] in option.text
    assert picker.first_selected_option.get_attribute("value") == default

    # Another model where the stack serves one, chosen by keyboard: its name typed into the focused picker.
    chosen = next((name for name in ready if name != default), default)
    element.send_keys(chosen)
    assert picker.first_selected_option.get_attribute("value") == chosen
    card = models[chosen]["card"]
    version = max(models[chosen]["served_versions"], key=int)
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text.startswith(f"Model {chosen} {version}"),
             f"the card of {chosen}")
    # Its card: each class with its palette colour, the input it is fed, its engine; a card inferred says so.
    items = browser.find_elements(By.CSS_SELECTOR, "#card-classes li")
    assert [item.text.split(" (")[0] for item in items] == card["classes"]
    for item, colour in zip(items, card["palette"], strict=True):
        rgb = ", ".join(map(str, colour))
        assert item.find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color") in (
            f"rgba({rgb}, 1)", f"rgb({rgb})")
    assert [item.text.endswith("(kept by the cutout)") for item in items] == [
        name in card["foreground"] for name in card["classes"]]
    facts = browser.find_element(By.ID, "card-facts").text
    assert card["engine"] in facts
    size = card.get("input", {}).get("size")
    assert size is None or f"{size[0]} × {size[1]} pixels" in facts
    for key in ("license", "source"):
        assert not isinstance(card.get(key), str) or card[key] in facts
    assert browser.find_element(By.ID, "inferred").is_displayed() == (card.get("card") == "inferred")

    # An upload is answered by the chosen model: its X-Model beside the result, its shares, as /infer?model= gives.
    photo = SAMPLES / "scene-1.jpg"
    expected = stack.infer(photo.read_bytes(), f"?format=json&model={chosen}")
    assert expected.status == 200 and expected.headers["X-Model"] == f"{chosen}/{version}"
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_segmented(browser, photo.name)
    assert browser.find_element(By.ID, "answered-by").is_displayed()
    assert browser.find_element(By.ID, "x-model").text == f"{chosen}/{version}"
    shares = [float(cell.get_attribute("data-fraction"))
              for cell in browser.find_elements(By.CSS_SELECTOR, "#legend tbody td:last-child")]
    assert shares == [expected.json()["fractions"][name] for name in expected.json()["classes"]]

    # Picking the default again, with the mouse this time, sends the image on screen to it. (Not by typing again:
    # keys typed within a second of the first name would add to Chromium's type-ahead search instead.)
    if chosen != default:
        picker.select_by_value(default)
        answered = f"{default}/{max(models[default]['served_versions'], key=int)}"
        wait_for(browser, lambda d: d.find_element(By.ID, "x-model").text == answered, f"the answer of {default}")
    assert console_errors(browser) == []


def test_the_cutout_is_shown_on_a_checkerboard_and_downloads_as_an_rgba_png(browser, stack, downloads):
    served = served_models(stack)
    name = served["default"]
    card = served["models"][name]["card"]
    photo = SAMPLES / "scene-0.jpg"
    data = photo.read_bytes()
    cutout = stack.infer(data, f"?format=cutout&model={name}")
    assert cutout.status == 200 and cutout.headers["Content-Type"] == "image/png"
    mask = stack.infer(data, f"?format=png&model={name}")
    with Image.open(io.BytesIO(mask.body)) as mask_image:
        classes = np.asarray(mask_image)

    open_page(browser, stack, DESKTOP)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_segmented(browser, photo.name)
    image = wait_cutout(browser)
    assert (image.get_property("naturalWidth"), image.get_property("naturalHeight")) == classes.shape[::-1]
    assert "conic-gradient" in image.value_of_css_property("background-image")  # the checkerboard behind it
    note = browser.find_element(By.ID, "cutout-note").text
    assert all(kept in note for kept in card["foreground"]), note

    # The download: the server's cutout for the same bytes; alpha 255 on the foreground classes, else 0.
    saved = download(browser, "cutout-download", downloads, "scene-0-cutout.png")
    assert saved == cutout.body
    with Image.open(io.BytesIO(saved)) as picture:
        assert picture.format == "PNG" and picture.mode == "RGBA"
        alpha = np.asarray(picture)[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255 and np.isin(alpha, (0, 255)).all()
    # Not pixel for pixel: the mask answer decodes a JPEG at a reduced draft size, the cutout at its full size
    # (99.83 % to 100 % of the samples' pixels agree).
    foreground = [card["classes"].index(kept) for kept in card["foreground"]]
    assert np.mean((alpha == 255) == np.isin(classes, foreground)) > 0.99
    assert console_errors(browser) == []


# An older server, with no GET /v1/models: the page's fetch of it answered 404 as such a server would.
OLDER_SERVER = """
const fetched = window.fetch;
window.fetch = (url, ...rest) => String(url).startsWith("/v1/models")
  ? Promise.resolve(new Response(JSON.stringify({error: {code: "not_found", message: "no such path"}}),
                                 {status: 404, headers: {"Content-Type": "application/json"}}))
  : fetched(url, ...rest);
"""


def test_with_no_model_list_the_default_model_answers_with_no_picker(browser, stack):
    card = stack.request("GET", "/v1/model").json()
    photo = SAMPLES / "scene-2.jpg"
    expected = stack.infer(photo.read_bytes(), "?format=json")
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": OLDER_SERVER})
    try:
        open_page(browser, stack, DESKTOP)
        assert f"Model {card['name']} {card['version']}" in browser.find_element(By.ID, "model").text
        assert not browser.find_element(By.ID, "model-choice").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait_segmented(browser, photo.name)
        assert browser.find_element(By.ID, "x-model").text == expected.headers["X-Model"]
        shares = [float(cell.get_attribute("data-fraction"))
                  for cell in browser.find_elements(By.CSS_SELECTOR, "#legend tbody td:last-child")]
        assert shares == [expected.json()["fractions"][name] for name in expected.json()["classes"]]
        assert not browser.find_element(By.ID, "cutout-figure").is_displayed()
        assert console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]})


def test_the_servers_error_messages_are_shown(browser, stack_factory, tmp_path):
    limit = 20_000
    # A small body limit, and a rate limit that a few requests in a row reach.
    small = stack_factory(SEGAPP_MAX_BODY_BYTES=str(limit), SEGAPP_NGINX_RATE="1r/m", SEGAPP_NGINX_BURST="6")
    big = SAMPLES / "scene-0.jpg"
    assert big.stat().st_size > limit
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not an image")
    cases = [
        (big, "image/jpeg", 413),
        (corrupt, "image/jpeg", 400),
        (text, "text/plain", 415),
    ]
    open_page(browser, small, DESKTOP)
    for path, content_type, status in cases:
        answer = small.infer(path.read_bytes(), "?format=json", headers={"Content-Type": content_type})
        assert answer.status == status
        message = answer.json()["error"]["message"]
        browser.find_element(By.ID, "file").send_keys(str(path))
        error = wait_for(browser, shown_error(path.name), f"the error for {path.name}")
        assert message in error.text
        assert f"{status} {answer.json()['error']['code']}" in error.text
        assert not browser.find_element(By.ID, "result").is_displayed()
        # The browser itself logs every answer over 399 as a failed load; nothing else may reach the console.
        errors = console_errors(browser)
        assert all(entry["source"] == "network" and f"status of {status}" in entry["message"]
                   for entry in errors), errors

    # The same image again and again, until nginx's rate limit answers: its JSON message and its Retry-After.
    sample = SAMPLES / "scene-3.jpg"
    for _ in range(12):
        browser.execute_script("document.getElementById('status').textContent = '';")  # not the last answer's
        browser.find_element(By.ID, "file").send_keys(str(sample))
        wait_for(browser, lambda d: d.find_element(By.ID, "status").text == f"{sample.name} segmented."
                 or d.find_element(By.ID, "error").is_displayed(), f"the answer for {sample.name}")
        if browser.find_element(By.ID, "error").is_displayed():
            break
    limited = small.infer(sample.read_bytes(), "?format=json")
    assert limited.status == 429
    error = browser.find_element(By.ID, "error").text
    assert limited.json()["error"]["message"] in error and "429 rate_limited" in error and "Retry after 1 s." in error
    errors = console_errors(browser)
    assert errors and all(entry["source"] == "network" and "status of 429" in entry["message"] for entry in errors)


def test_nginx_serves_the_page_with_its_headers_and_the_api_as_before(stack):
    page = stack.request("GET", "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.body == (ROOT / "web" / "index.html").read_bytes()
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["Cache-Control"] == "no-cache" and page.headers["ETag"]
    # The server's own headers are still sent from a location that adds headers of its own.
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["X-Request-ID"]
    revalidated = stack.request("GET", "/", headers={"If-None-Match": page.headers["ETag"]})
    assert revalidated.status == 304 and revalidated.body == b""

    scripts = [("/" + path.name, "application/javascript") for path in sorted((ROOT / "web").glob("*.js"))]
    assert [path for path, _ in scripts] == ["/api.js", "/app.js", "/models.js", "/png.js"]
    for path, media_type in (*scripts, ("/app.css", "text/css"), ("/samples/scene-0.jpg", "image/jpeg")):
        asset = stack.request("GET", path)
        assert asset.status == 200 and asset.headers["Content-Type"].split(";")[0] == media_type
        assert asset.body == (ROOT / "web" / path.lstrip("/")).read_bytes()
        assert asset.headers["Cache-Control"] == "public, max-age=3600"
        assert asset.headers["X-Content-Type-Options"] == "nosniff" and asset.headers["X-Request-ID"]

    # Not the page's: the script that makes the samples, and any path the app does not know, are JSON 404s.
    for path in ("/make_samples.py", "/index.html", "/samples/nope.jpg", "/nope"):
        missing = stack.request("GET", path)
        assert missing.status == 404 and missing.json()["error"]["code"] == "not_found", path
    assert stack.request("POST", "/", b"x").json()["error"]["code"] == "method_not_allowed"
    assert stack.request("GET", "/healthz").status == 200
    assert stack.infer((SAMPLES / "scene-3.jpg").read_bytes()).headers["Content-Type"] == "image/png"
