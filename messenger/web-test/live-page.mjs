// Loads the messenger's live page in headless Chromium and checks that it shows both paths and
// updates while messages arrive; saves a screenshot. Usage: node live-page.mjs URL SCREENSHOT COUNT
// (COUNT: the messages each path delivers in the run being watched).
import { chromium } from "playwright-core";

const [url, screenshot, countArg] = process.argv.slice(2);
const count = Number(countArg);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});
const fail = async (why) => {
  console.error("FAIL:", why);
  await browser.close();
  process.exit(1);
};
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 15000 });
  const received = () => page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll("#paths tbody tr")].map((tr) => [tr.cells[0].textContent, Number(tr.cells[2].textContent)])));
  await page.waitForFunction(() => document.querySelectorAll("#paths tbody tr").length === 2, null, { timeout: 20000 });
  const first = await received();
  if (!("kafka" in first) || !("mysql" in first)) await fail(`both paths should be shown, got ${JSON.stringify(first)}`);
  // Wait until the figures move while messages arrive, and reach the whole run on both paths.
  // (A path may already be complete when the page first shows it: the Kafka path is fast, and
  // Chromium can take seconds to start on a loaded machine.)
  const moved = (l) => l.kafka > first.kafka || l.mysql > first.mysql;
  const complete = (l) => l.kafka === count && l.mysql === count;
  let later = first;
  const deadline = Date.now() + 60000;
  while (Date.now() < deadline && !(moved(later) && complete(later))) {
    await page.waitForTimeout(500);
    later = await received();
  }
  if (!moved(later)) await fail(`no update: ${JSON.stringify(first)} then ${JSON.stringify(later)}`);
  if (!complete(later)) await fail(`not every message shown: ${JSON.stringify(later)}, expected ${count} per path`);
  const headers = await page.evaluate(() => [...document.querySelectorAll("#paths thead th")].map((th) => th.textContent));
  for (const h of ["missing", "early", "duplicates", "p99.9 ms"]) if (!headers.includes(h)) await fail(`no ${h} column: ${headers}`);
  if (await page.evaluate(() => document.getElementById("chart").dataset.scale) !== "log") await fail("the chart is not on a log scale");
  // Once the run reports: missing instead of pending, and the lateness distribution per path.
  await page.waitForFunction(() => !document.getElementById("dist-box").hidden, null, { timeout: 90000 });
  const dist = await page.evaluate(() => ({
    head: [...document.querySelectorAll("#dist thead th")].map((th) => th.textContent),
    rows: [...document.querySelectorAll("#dist tbody tr")].map((tr) => [...tr.cells].map((c) => c.textContent)),
  }));
  if (dist.rows.length !== 2 || !dist.head.some((h) => h.endsWith("ms"))) await fail(`no distribution: ${JSON.stringify(dist)}`);
  const counted = dist.rows.map((r) => r.slice(1).reduce((a, c) => a + Number(c), 0));
  const receivedNow = await received();
  if (counted[0] !== receivedNow[dist.rows[0][0]]) await fail(`distribution ${JSON.stringify(dist)} does not add up to ${JSON.stringify(receivedNow)}`);
  const points = await page.evaluate(() => document.getElementById("chart").toDataURL().length);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`OK: received ${JSON.stringify(first)} then ${JSON.stringify(later)}; distribution ${JSON.stringify(dist.rows)}; chart ${points} bytes; screenshot ${screenshot}`);
  await browser.close();
} catch (e) {
  await fail(e.message);
}
