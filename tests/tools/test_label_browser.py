"""The labelling page in a real headless Chromium (Selenium + Debian's chromium and chromium-driver).

`make test` installs the browser (Makefile target ``browser``). Without it these tests skip, unless
``FLAN_RLHF_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing browser fails them.
``FLAN_RLHF_SCREENSHOT=docs/images/label_page.png`` also saves the page's screenshot there (docs/labelling.md).
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager

import pytest

from flan_rlhf.label_store import LabelStore
from tests.label_helpers import LabelServer

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("FLAN_RLHF_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromedriver are needed for the browser tests - `make browser` installs them")
    pytest.skip("no chromium/chromedriver: `make browser` installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: readable pairs, as a summariser's two samples might be (one of each pair rude or off)
PAIRS = [
    ("Summarize: #Person1# asks #Person2# to move the meeting to Friday. #Person2# agrees.",
     "Person1 asks to move the meeting to Friday and Person2 agrees.",
     "Person1 wants the meeting on Friday. What an idiot, Person2 agrees anyway."),
    ("Summarize: #Person1# orders a pizza with extra cheese. #Person2# says it will take 30 minutes.",
     "Person1 orders a cheese pizza; it will arrive in 30 minutes.",
     "Person1 orders pizza. Person2 is slow and stupid."),
    ("Summarize: #Person1# lost a wallet at the station. #Person2# found it and returns it.",
     "Person2 returns the wallet Person1 lost at the station.",
     "Person2 found a wallet."),
    ("Summarize: #Person1# invites #Person2# to a concert. #Person2# cannot come because of work.",
     "Person2 turns down Person1's concert invitation because of work.",
     "Person2 cannot come to the concert because of work."),
    ("Summarize: #Person1# complains about noise. #Person2# promises to keep it down.",
     "Shut up, Person1.",
     "Get lost, noisy neighbour."),
    ("Summarize: #Person1# asks for directions to the museum. #Person2# explains the way.",
     "Person2 tells Person1 how to reach the museum.",
     "Person1 asks the way to the museum and Person2 explains it."),
]


@contextmanager
def serving(folder, *args: str):
    """A store of :data:`PAIRS` in ``folder`` and ``flan-rlhf label --store it *args`` serving it: ``(store, server)``."""
    url = f"sqlite:///{folder}/labels.db"
    store = LabelStore(url, create=True)
    store.add_pairs([{"prompt": prompt, "response_a": a, "response_b": b, "source_a": {"model": "demo", "draw": 1},
                      "source_b": {"model": "demo", "draw": 2}} for prompt, a, b in PAIRS], seed=0)
    server = LabelServer(["--store", url, *args], folder / "server.log")
    try:
        yield store, server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,560", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shown(driver) -> tuple[int, str, str, str]:
    """``(pair id, prompt, left, right)`` as the page shows them."""
    find = driver.find_element
    return (int(find(By.ID, "work").get_attribute("data-pair-id")), find(By.ID, "prompt").text,
            find(By.ID, "left").text, find(By.ID, "right").text)


def wait_for_progress(driver, labelled: int, total: int = len(PAIRS)) -> None:
    """Until the page says ``labelled / total`` and shows a new pair (or the end)."""
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "progress").text == f"{labelled} / {total} labelled"
        and not d.find_element(By.ID, "btn-left").get_attribute("disabled"))


def press(driver, key: str) -> None:
    """A key pressed on the page (not in a text field)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_label_by_clicks_and_keys_undo_reload_and_the_store_is_exact(tmp_path, browser):
    given: list[tuple[int, str, str, str]] = []  # (pair id, choice, note, labeller) the store must hold
    with serving(tmp_path, "--labeller", "ann") as (store, server):
        browser.get(server.url + "/")
        wait_for_progress(browser, 0)
        first = shown(browser)
        assert first[1] in [prompt for prompt, _, _ in PAIRS] and {first[2], first[3]} == next(
            {a, b} for prompt, a, b in PAIRS if prompt == first[1])
        if os.environ.get("FLAN_RLHF_SCREENSHOT"):
            browser.save_screenshot(os.environ["FLAN_RLHF_SCREENSHOT"])
        browser.find_element(By.ID, "btn-left").click()  # a click
        given.append((first[0], "left", "", "ann"))
        wait_for_progress(browser, 1)
        second = shown(browser)
        press(browser, "2")  # the keyboard
        given.append((second[0], "right", "", "ann"))
        wait_for_progress(browser, 2)
        third = shown(browser)
        browser.find_element(By.ID, "note").send_keys("both fine; 3 typed here is text, not a label")
        browser.find_element(By.ID, "btn-tie").click()
        given.append((third[0], "tie", "both fine; 3 typed here is text, not a label", "ann"))
        wait_for_progress(browser, 3)
        fourth = shown(browser)
        press(browser, "4")  # both unacceptable ...
        wait_for_progress(browser, 4)
        press(browser, "u")  # ... taken back: the same pair is shown again
        wait_for_progress(browser, 3)
        assert shown(browser) == fourth
        press(browser, "1")
        given.append((fourth[0], "left", "", "ann"))
        wait_for_progress(browser, 4)
        fifth = shown(browser)

        browser.refresh()  # a reload keeps the tab's client id, so the same pair
        wait_for_progress(browser, 4)
        assert shown(browser) == fifth
        labeller = browser.find_element(By.ID, "labeller")
        labeller.clear()
        labeller.send_keys("maria\t")  # the change event stores it for this browser
        browser.find_element(By.ID, "btn-bad").click()
        given.append((fifth[0], "both_unacceptable", "", "maria"))
        wait_for_progress(browser, 5)
        sixth = shown(browser)
        browser.refresh()
        wait_for_progress(browser, 5)
        assert browser.find_element(By.ID, "labeller").get_attribute("value") == "maria"
        press(browser, "2")
        given.append((sixth[0], "right", "", "maria"))
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "done").is_displayed())
        assert browser.find_element(By.ID, "progress").text == "6 / 6 labelled"
        assert browser.find_element(By.ID, "status").text == ""  # no error was shown
    assert len({pair_id for pair_id, *_ in given}) == len(PAIRS)
    judgements = store.judgements()
    assert [(j["id"], j["choice"], j["note"], j["labeller"]) for j in judgements] == given
    for judgement, page in zip(judgements, [first, second, third, fourth, fifth, sixth]):
        left_text = judgement[f"response_{judgement['shown_left']}"]
        assert left_text == page[2]  # the recorded order is the order the page showed
        if judgement["choice"] == "left":
            assert (judgement["chosen"], judgement["rejected"]) == (page[2], page[3])
        if judgement["choice"] == "right":
            assert (judgement["chosen"], judgement["rejected"]) == (page[3], page[2])


def test_off_loopback_the_page_asks_for_the_token(tmp_path, browser):
    # a token set explicitly; the page is still reached over loopback, where the token is checked all the same
    with serving(tmp_path, "--token", "tok-123456") as (store, server):
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda d: _alert(d))
        alert = browser.switch_to.alert
        assert "needs a token" in alert.text
        alert.send_keys("tok-123456")
        alert.accept()
        wait_for_progress(browser, 0)
        press(browser, "1")
        wait_for_progress(browser, 1)
    assert [j["choice"] for j in store.judgements()] == ["left"]


def _alert(driver) -> bool:
    try:
        driver.switch_to.alert
        return True
    except Exception:  # noqa: BLE001 - NoAlertPresentException until the page asks
        time.sleep(0.1)
        return False


def test_a_pair_lost_to_another_labeller_is_refused_and_the_page_moves_on(tmp_path, browser):
    from tests.label_helpers import api

    with serving(tmp_path, "--lease_seconds", "1") as (store, server):
        browser.get(server.url + "/")
        wait_for_progress(browser, 0)
        held = shown(browser)
        time.sleep(1.5)  # the page's lease runs out; another labeller is given the pair and judges it
        status, served = api(f"{server.url}/api/next?client=otherlabeller")
        assert status == 200 and served["pair"]["pair_id"] == held[0]
        assert api(f"{server.url}/api/label", "POST", {"pair_id": held[0], "client": "otherlabeller",
                                                       "choice": "right", "labeller": "bob"})[0] == 200
        press(browser, "1")
        WebDriverWait(browser, 30).until(lambda d: "not held by this page" in d.find_element(By.ID, "status").text
                                         or "already labelled" in d.find_element(By.ID, "status").text)
        WebDriverWait(browser, 30).until(lambda d: shown(d)[0] != held[0])  # the next pair, without a reload
        assert browser.find_element(By.ID, "progress").text == "1 / 6 labelled"
    assert [(j["id"], j["choice"], j["labeller"]) for j in store.judgements()] == [(held[0], "right", "bob")]
