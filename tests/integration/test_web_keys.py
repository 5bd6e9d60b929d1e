"""The try-it page against a stack that needs API keys (SEGAPP_API_KEYS_FILE), in headless Chromium: the page asks
for a key when the server answers 401, says so when the key is refused, and once given one keeps it in this tab
only (sessionStorage) and sends it with every request, the model list and the inference alike.

One stack and one browser for the whole story, in one test: each stack start costs seconds of the suite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.integration.conftest import start_stack
from tests.integration.test_web import (
    DESKTOP,
    ROOT,
    SAMPLES,
    chromium,
    console_errors,
    emulate,
    open_page,
    wait_cutout,
    wait_for,
    wait_segmented,
)

pytestmark = pytest.mark.integration

KEY_ITEM = "segapp-api-key"  # web/api.js's sessionStorage item
# Well formed, but its key ID is in no keys file.
WRONG_KEY = "sgk_wrong000_" + "x" * 43


@pytest.fixture(scope="module")
def keys_file():
    """A keys file with one key, made by `segapp-keys add`, in a folder the user the workers drop to can read:
    (its path, the key)."""
    folder = Path(tempfile.mkdtemp(prefix="segapp-keys-"))
    folder.chmod(0o755)
    path = folder / "api-keys"
    made = subprocess.run([sys.executable, "-m", "segapp.keys", "--file", str(path), "add", "browser"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the workers' user, as segapp-keys writes a new file
    yield path, made.stdout.strip()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def keyed_stack(keys_file):
    running = start_stack(SEGAPP_API_KEYS_FILE=str(keys_file[0]))
    yield running
    running.stop()
    shutil.rmtree(running.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def key_form_asking(driver, says: str) -> None:
    """Wait until the key form is shown with a message that holds `says`."""
    wait_for(driver, lambda d: d.find_element(By.ID, "key-form").is_displayed()
             and says in d.find_element(By.ID, "key-message").text, f"the key form saying {says!r}")


def type_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    assert field.get_attribute("type") == "password"  # not shown on screen as it is typed
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()


def stored(driver) -> dict:
    """What the page keeps: its sessionStorage item, and how much is in localStorage and cookies."""
    return driver.execute_script("return {session: sessionStorage.getItem(arguments[0]),"
                                 " local: localStorage.length, cookie: document.cookie};", KEY_ITEM)


def only_refusals(errors: list[dict]) -> bool:
    """The browser logs every 401 as a failed load; nothing else may reach the console."""
    return bool(errors) and all(entry["source"] == "network" and "status of 401" in entry["message"]
                                for entry in errors)


def test_the_page_asks_for_a_key_keeps_it_in_the_tab_and_sends_it(browser, keyed_stack, keys_file):
    _, key = keys_file
    refused = keyed_stack.request("GET", "/v1/models")
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == 'Bearer realm="segapp"'
    message = refused.json()["error"]["message"]
    sample = SAMPLES / "scene-2.jpg"
    expected = keyed_stack.infer(sample.read_bytes(), "?format=json", headers={"Authorization": f"Bearer {key}"})
    assert expected.status == 200

    # No key yet: GET /v1/models answers 401, and the page asks for one with the server's message.
    emulate(browser, DESKTOP, phone=False)
    browser.get(keyed_stack.url + "/")
    key_form_asking(browser, "This server needs an API key")
    assert message in browser.find_element(By.ID, "key-message").text
    assert not browser.find_element(By.ID, "model").text.startswith("Model ")

    # A wrong key: refused, said so, asked again; it is not kept.
    type_key(browser, WRONG_KEY)
    key_form_asking(browser, "The key was refused")
    assert message in browser.find_element(By.ID, "key-message").text
    assert stored(browser) == {"session": None, "local": 0, "cookie": ""}
    assert only_refusals(console_errors(browser))

    # The right key: the models load, the form goes, and the key is in this tab's sessionStorage only.
    type_key(browser, key)
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text.startswith("Model "), "the model card")
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert browser.find_element(By.ID, "model-choice").is_displayed()
    assert stored(browser) == {"session": key, "local": 0, "cookie": ""}
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""

    # Reloaded, the tab still has its key: no question, and a sample is segmented with it.
    open_page(browser, keyed_stack, DESKTOP)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "[data-sample='samples/scene-2.jpg']").send_keys(Keys.ENTER)
    wait_segmented(browser, sample.name)
    assert browser.find_element(By.ID, "x-model").text == expected.headers["X-Model"]
    shares = [float(cell.get_attribute("data-fraction"))
              for cell in browser.find_elements(By.CSS_SELECTOR, "#legend tbody td:last-child")]
    assert shares == [expected.json()["fractions"][name] for name in expected.json()["classes"]]
    wait_cutout(browser)
    assert console_errors(browser) == []

    # The key gone (as in a new tab) while the page is open: the POST /infer answers 401, the form asks, and the
    # same image is sent again with the key typed.
    browser.execute_script("sessionStorage.clear(); document.getElementById('status').textContent = '';")
    browser.find_element(By.CSS_SELECTOR, "[data-sample='samples/scene-2.jpg']").send_keys(Keys.ENTER)
    key_form_asking(browser, "This server needs an API key")
    type_key(browser, key)
    wait_segmented(browser, sample.name)
    wait_cutout(browser)
    assert stored(browser) == {"session": key, "local": 0, "cookie": ""}
    assert only_refusals(console_errors(browser))

