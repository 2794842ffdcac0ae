// Loads the messenger's live page in headless Chromium and checks that it shows both paths and
// updates while messages arrive; saves a screenshot. Usage: node live-page.mjs URL SCREENSHOT
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
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
  // Wait until the figures move on both paths while messages arrive.
  let later = first;
  const deadline = Date.now() + 30000;
  while (Date.now() < deadline && !(later.kafka > first.kafka && later.mysql > first.mysql)) {
    await page.waitForTimeout(500);
    later = await received();
  }
  if (!(later.kafka > first.kafka && later.mysql > first.mysql)) await fail(`no update: ${JSON.stringify(first)} then ${JSON.stringify(later)}`);
  const points = await page.evaluate(() => document.getElementById("chart").toDataURL().length);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`OK: received ${JSON.stringify(first)} then ${JSON.stringify(later)}; chart ${points} bytes; screenshot ${screenshot}`);
  await browser.close();
} catch (e) {
  await fail(e.message);
}
