// Loads the messenger's live page in headless Chromium and checks that it shows both paths, that
// its figures move while messages arrive, that once the run has reported every number it shows is
// the run's (the messenger's `/api/report`), and that the chart's x axis is a time axis; saves a
// screenshot. Usage: node live-page.mjs URL SCREENSHOT COUNT (COUNT: the messages each path
// delivers in the run being watched).
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
const json = async (path) => {
  const res = await fetch(url + path);
  if (!res.ok) throw new Error(`GET ${path}: ${res.status} ${await res.text()}`);
  return res.json();
};

// What the page shows, read from the rendered DOM by its stable selectors.
const readPage = () => {
  const table = (id) => Object.fromEntries([...document.querySelectorAll(`#${id} tbody tr`)].map((tr) =>
    [tr.dataset.key, Object.fromEntries([...tr.querySelectorAll("td[data-field]")].map((td) => [td.dataset.field, td.textContent]))]));
  return {
    run: document.getElementById("run").textContent,
    total: Object.fromEntries(["sent", "delivered", "pending", "failed", "attempts", "reprocessed"]
      .map((k) => [k, document.getElementById("t-" + k).textContent])),
    paths: table("paths"),
    senders: table("senders"),
    dist: table("dist"),
  };
};

// How the page writes a number: as it is (integers), "-" for none; processing seconds to 2 places.
const shownAs = (v) => (v === null || v === undefined ? "-" : String(v));

// Every number the page shows against the report (and, for the figures the report does not hold,
// attempts, re-processed and the senders' totals, against `/monitor`, which the page renders).
// Returns the differences, empty when the page shows the run's numbers.
function differences(shown, report, monitor) {
  const diffs = [];
  const expect = (where, got, want) => { if (got !== want) diffs.push(`${where}: page shows ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`); };
  expect("run", shown.run, report.run_id);
  const names = report.paths.map((p) => p.path);
  expect("paths", JSON.stringify(Object.keys(shown.paths).sort()), JSON.stringify([...names].sort()));
  // Page column (a `/monitor` field) → the report's field; pending is 0 once the run has reported.
  const columns = {
    sent: "sent", received: "received", missing: "missing", early: "early", duplicates: "duplicates",
    p50_ms: "lateness_p50_ms", p99_ms: "lateness_p99_ms", p999_ms: "lateness_p999_ms", max_ms: "lateness_max_ms",
    cancelled: "cancelled", cancelled_arrived: "cancelled_delivered", rescheduled: "rescheduled",
  };
  const sum = (f) => report.paths.reduce((a, p) => a + p[f], 0);
  for (const p of report.paths) {
    const row = shown.paths[p.path] || {};
    for (const [col, field] of Object.entries(columns)) expect(`${p.path} ${col}`, row[col], shownAs(p[field]));
    expect(`${p.path} pending`, row.pending, "0");
    // The distribution counts each received message once.
    const dist = shown.dist[p.path];
    if (!dist) diffs.push(`${p.path}: no distribution row`);
    else expect(`${p.path} distribution total`, Object.values(dist).reduce((a, c) => a + Number(c), 0), p.received);
  }
  expect("total sent", shown.total.sent, shownAs(sum("sent")));
  expect("total delivered", shown.total.delivered, shownAs(sum("received")));
  expect("total pending", shown.total.pending, "0");
  expect("total SMS failed", shown.total.failed, shownAs(sum("sms_failed")));
  expect("total attempts", shown.total.attempts, shownAs(monitor.total.attempts));
  expect("total re-processed", shown.total.reprocessed, shownAs(monitor.total.reprocessed));
  expect("senders", JSON.stringify(Object.keys(shown.senders).sort()), JSON.stringify(Object.keys(monitor.senders).sort()));
  for (const [id, s] of Object.entries(monitor.senders)) {
    const row = shown.senders[id] || {};
    expect(`sender ${id} attempts sent`, row.success_count, shownAs(s.success_count));
    expect(`sender ${id} attempts failed`, row.failed_count, shownAs(s.failed_count));
    expect(`sender ${id} processing s`, row.total_processing_time, s.total_processing_time.toFixed(2));
  }
  return diffs;
}

// The chart is drawn on a canvas: record what each frame draws on it (text, and the points of each
// stroke) so the axis can be read back. A frame starts with the clearing of the whole canvas.
function recordChart() {
  const proto = CanvasRenderingContext2D.prototype;
  const onChart = (ctx) => ctx.canvas.id === "chart";
  let frame = null, path = [];
  const { clearRect, fillText, beginPath, moveTo, lineTo, stroke } = proto;
  proto.clearRect = function (...a) {
    if (onChart(this)) window.__chartFrame = frame = { texts: [], strokes: [] };
    return clearRect.apply(this, a);
  };
  proto.fillText = function (text, x, y, ...rest) {
    if (onChart(this) && frame) frame.texts.push({ text: String(text), x, y, align: this.textAlign });
    return fillText.call(this, text, x, y, ...rest);
  };
  proto.beginPath = function () { if (onChart(this)) path = []; return beginPath.call(this); };
  proto.moveTo = function (x, y) { if (onChart(this)) path.push({ x, y }); return moveTo.call(this, x, y); };
  proto.lineTo = function (x, y) { if (onChart(this)) path.push({ x, y }); return lineTo.call(this, x, y); };
  proto.stroke = function (...a) {
    if (onChart(this) && frame) frame.strokes.push({ points: path, width: this.lineWidth });
    return stroke.apply(this, a);
  };
}

// The x axis is a time axis: its tick labels are clock times (hh:mm:ss; the browser runs in UTC),
// in order left to right, placed in proportion to the time between them (not one step per point),
// within the seconds the chart plots; and every point of the plotted lines sits at a second that
// `/monitor`'s series has. Returns what is wrong, or null.
function timeAxisProblem(frame, series) {
  if (!frame) return "nothing drawn on the chart";
  if (series.length < 2) return `too few seconds in /monitor's series: ${JSON.stringify(series)}`;
  const t0 = series[0].t, t1 = series[series.length - 1].t;
  const ticks = frame.texts.filter((l) => /^\d\d:\d\d:\d\d$/.test(l.text));
  const labels = JSON.stringify(frame.texts.map((l) => l.text));
  if (ticks.length < 2) return `the x axis has no clock-time ticks; the chart's labels: ${labels}`;
  if (ticks.some((l) => l.y !== ticks[0].y || l.align !== "center")) return `the clock ticks are not one centred row: ${JSON.stringify(ticks)}`;
  // Each label as a Unix second: the one in [t0, t0 + 1 day) with that time of day (UTC).
  const at = ticks.map((l) => {
    const [h, m, s] = l.text.split(":").map(Number);
    return { x: l.x, t: t0 + ((((h * 3600 + m * 60 + s) - t0) % 86400) + 86400) % 86400, text: l.text };
  });
  for (let i = 1; i < at.length; i++) {
    if (!(at[i].x > at[i - 1].x && at[i].t > at[i - 1].t)) return `ticks not in time order left to right: ${JSON.stringify(at)}`;
  }
  if (at[at.length - 1].t > t1) return `a tick after the last second plotted (${t1}): ${JSON.stringify(at)}`;
  const perSecond = (at[at.length - 1].x - at[0].x) / (at[at.length - 1].t - at[0].t);
  const xOf = (t) => at[0].x + perSecond * (t - at[0].t);
  for (const a of at) if (Math.abs(a.x - xOf(a.t)) > 0.5) return `ticks not spaced by time: ${JSON.stringify(at)}`;
  // The plotted lines: strokes of more than two points (the grid lines and tick marks have two).
  const seconds = new Set(series.map((p) => p.t));
  const lines = frame.strokes.filter((s) => s.points.length > 2);
  if (!lines.length) return "no line plotted on the chart";
  for (const line of lines) {
    for (const pt of line.points) {
      const t = at[0].t + (pt.x - at[0].x) / perSecond;
      if (!seconds.has(Math.round(t)) || Math.abs(t - Math.round(t)) > 0.01) {
        return `a point at x ${pt.x} is at ${t} s by the axis, not a second of the series [${t0}, ${t1}]`;
      }
    }
  }
  const now = Date.now() / 1000;
  if (!(t1 <= now + 5 && t1 > now - 600)) return `the last second plotted, ${t1}, is not a recent time (now ${now})`;
  return null;
}

try {
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 }, timezoneId: "UTC" });
  await context.addInitScript(recordChart);
  // Received per path, by the rows' data-key and the cells' data-field (NaN where there is none).
  await context.addInitScript(() => {
    window.__received = () => Object.fromEntries([...document.querySelectorAll("#paths tbody tr")]
      .map((tr) => [tr.dataset.key, Number(tr.querySelector('[data-field="received"]')?.textContent ?? NaN)]));
  });
  const page = await context.newPage();
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 15000 });
  await page.waitForFunction(() => document.querySelectorAll("#paths tbody tr").length === 2, null, { timeout: 20000 });
  const received = () => page.evaluate(() => window.__received());
  const first = await received();
  if (!Number.isInteger(first.kafka) || !Number.isInteger(first.mysql)) {
    await fail(`both paths should be shown, rows by data-key and cells by data-field; got ${JSON.stringify(first)} from ${await page.innerHTML("#paths tbody")}`);
  }
  // Wait until the figures move while messages arrive, and reach the whole run on both paths.
  // (A path may already be complete when the page first shows it: the Kafka path is fast, and
  // Chromium can take seconds to start on a loaded machine.)
  try {
    await page.waitForFunction(([first, count]) => {
      const l = window.__received();
      return (l.kafka > first.kafka || l.mysql > first.mysql) && l.kafka === count && l.mysql === count;
    }, [first, count], { timeout: 60000, polling: 250 });
  } catch {
    await fail(`the figures did not move from ${JSON.stringify(first)} to ${count} per path: ${JSON.stringify(await received())}`);
  }
  const later = await received();
  const headers = await page.evaluate(() => [...document.querySelectorAll("#paths thead th")].map((th) => th.textContent));
  for (const h of ["missing", "early", "duplicates", "p99.9 ms"]) if (!headers.includes(h)) await fail(`no ${h} column: ${headers}`);
  if (await page.evaluate(() => document.getElementById("chart").dataset.scale) !== "log") await fail("the chart is not on a log scale");

  // Once the run reports (the distribution appears), the page must show the report's numbers. The
  // page redraws once a second: compare until it does, or until the deadline.
  await page.waitForFunction(() => !document.getElementById("dist-box").hidden, null, { timeout: 90000 });
  let shown, report, monitor, diffs;
  const deadline = Date.now() + 20000;
  for (;;) {
    [report, monitor] = await Promise.all([json("/api/report"), json("/monitor")]);
    shown = await page.evaluate(readPage);
    diffs = differences(shown, report, monitor);
    if (!diffs.length || Date.now() > deadline) break;
    await page.waitForTimeout(250);
  }
  if (diffs.length) await fail(`the page does not show the run's numbers:\n  ${diffs.join("\n  ")}\nreport ${JSON.stringify(report)}\npage ${JSON.stringify(shown)}`);
  const per = report.paths.map((p) => `${p.path} ${p.received}/${p.sent} p99 ${p.lateness_p99_ms} ms`).join(", ");
  if (report.paths.some((p) => p.sent !== count)) await fail(`the report is not of the watched run: ${per}, expected ${count} sent per path`);

  // The chart: a frame drawn from the series the page last received (the series only grows with
  // arrivals, none after the run has reported).
  const problem = timeAxisProblem(await page.evaluate(() => window.__chartFrame), (await json("/monitor")).series);
  if (problem) await fail(`the chart has no time axis: ${problem}`);
  const ticks = (await page.evaluate(() => window.__chartFrame)).texts.map((l) => l.text).filter((t) => /^\d\d:/.test(t));

  // The load ahead: the scheduler's /api/upcoming, asked through the messenger, drawn.
  const upcoming = await json("/api/upcoming");
  if (typeof upcoming.total !== "number" || !Array.isArray(upcoming.slices)) await fail(`/api/upcoming: ${JSON.stringify(upcoming)}`);
  await page.waitForFunction(() => window.__aheadDrawn > 0 && document.getElementById("ahead-status").textContent === "", null, { timeout: 15000 });

  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`OK: received ${JSON.stringify(first)} then ${JSON.stringify(later)}; page = report of ${report.run_id} (${per}); time axis ${ticks.join(" ")} UTC; screenshot ${screenshot}`);
  await browser.close();
} catch (e) {
  await fail(e.stack || e.message);
}
