// Drives the console in headless Chromium for services/gateway/tests/console.rs, which runs
// the deployment and checks every effect through the API. Steps are paced by the test: this
// script prints `step <name> <detail>` when a step is done and waits for a line on stdin
// before the next one (the test changes the deployment in between: kills and restarts a
// nats-server). Any failure exits non-zero with the reason on stderr.
//
// Environment: CONSOLE_URL (http://host:port/console), ADMIN_KEY, SCREENSHOTS (a folder),
// CHROMIUM (default /usr/bin/chromium), FAIL_REGION and TO_REGION (us, eu), DRILL_RUN.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const url = env("CONSOLE_URL");
const key = env("ADMIN_KEY");
const shots = env("SCREENSHOTS");
const region = env("FAIL_REGION", "us");
const to = env("TO_REGION", "eu");
const run = env("DRILL_RUN");
const WAIT = 60_000;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function step(name, detail = "") {
  process.stdout.write(`step ${name} ${detail}`.trim() + "\n");
  const next = await lines.next();
  if (next.done || next.value.trim() !== "go") throw new Error(`the test stopped after ${name}`);
}

const profile = mkdtempSync(join(tmpdir(), "meridian-console-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let exitCode = 0;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  // The key must never appear in a URL the page requests.
  const leaks = [];
  page.on("request", (r) => {
    if (r.url().includes(key)) leaks.push(r.url());
  });

  // 1. The page loads, asks for the key once, then shows both regions converged.
  await page.goto(url);
  await page.locator("#admin-key").fill(key);
  await page.locator("#operator").fill("drill-operator");
  await page.locator("#sign-in").click();
  for (const r of [region, to]) {
    await page.locator(`article.region[data-region="${r}"] [data-field="status"]`).filter({ hasText: "active" }).waitFor({ timeout: WAIT });
  }
  // Sparklines fill with the test's traffic for a few seconds before the picture.
  await page.waitForFunction(() => document.querySelectorAll("#streams tbody tr").length >= 4, null, { timeout: WAIT });
  await page.waitForTimeout(8000);
  await page.screenshot({ path: join(shots, "console.png"), fullPage: true });
  await step("loaded");
  await page.locator('#convergence[data-state="converged"]').waitFor({ timeout: WAIT });
  // Reloading the tab keeps the key (session storage): no second prompt.
  await page.reload();
  await page.locator('#convergence[data-state="converged"]').waitFor({ timeout: WAIT });
  if (await page.locator("#login").isVisible()) throw new Error("the key was asked again after a reload");
  await step("converged");

  // 2. Failover clicked in the page, with a confirmation naming what happens.
  await page.locator(`button[data-action="failover"][data-region="${region}"][data-to="${to}"]`).click();
  const dialog = page.locator("#confirm");
  await dialog.waitFor({ state: "visible" });
  const said = await page.locator("#confirm-text").innerText();
  for (const want of [`Users of region ${region} will be served by region ${to}`, "epochs change", "421"]) {
    if (!said.includes(want)) throw new Error(`the confirmation does not say "${want}": ${said}`);
  }
  await page.screenshot({ path: join(shots, "console-confirm.png") });
  await page.locator("#confirm-ok").click();
  await page.locator('#action-result[data-outcome="ok"]').waitFor({ timeout: WAIT });
  await page.locator(`article.region[data-region="${region}"] [data-field="status"]`).filter({ hasText: "failed" }).waitFor({ timeout: WAIT });
  await page.locator(`article.region[data-region="${to}"] [data-field="serving_for"]`).filter({ hasText: region }).waitFor({ timeout: WAIT });
  await page.screenshot({ path: join(shots, "console-failover.png"), fullPage: true });
  await step("failed-over", await page.locator("#action-result").innerText());

  // 3. Failback while the home region cannot tell whether it caught up: refused, with why.
  async function failback() {
    await page.locator(`button[data-action="failback"][data-region="${region}"]`).click();
    await dialog.waitFor({ state: "visible" });
    await page.locator("#confirm-ok").click();
    await page.locator('#action-result:is([data-outcome="ok"], [data-outcome="refused"], [data-outcome="error"])').waitFor({ timeout: WAIT });
    return page.locator("#action-result").getAttribute("data-outcome");
  }
  async function resetResult() {
    await page.evaluate(() => {
      const r = document.getElementById("action-result");
      delete r.dataset.outcome;
    });
  }
  await resetResult();
  if ((await failback()) !== "refused") throw new Error(`failback was not refused: ${await page.locator("#action-result").innerText()}`);
  const refusal = await page.locator("#action-result").innerText();
  if (!refusal.includes("not_caught_up")) throw new Error(`the refusal does not name its reason: ${refusal}`);
  await page.screenshot({ path: join(shots, "console-failback-refused.png"), fullPage: true });
  await step("failback-refused", refusal.replace(/\s+/g, " "));

  // 4. Failback once caught up: accepted (retried while the region still reports lag).
  let accepted = false;
  for (let i = 0; i < 20 && !accepted; i++) {
    await resetResult();
    accepted = (await failback()) === "ok";
    if (!accepted) await page.waitForTimeout(1500);
  }
  if (!accepted) throw new Error(`failback never accepted: ${await page.locator("#action-result").innerText()}`);
  await page.locator(`article.region[data-region="${region}"] [data-field="status"]`).filter({ hasText: "active" }).waitFor({ timeout: WAIT });
  const actions = await page.locator("#actions tbody").innerText();
  for (const want of ["drill-operator", `failover ${region} → ${to}`, `failback ${region}`, "not_caught_up"]) {
    if (!actions.includes(want)) throw new Error(`the action log does not show "${want}": ${actions}`);
  }
  await step("failed-back", await page.locator("#action-result").innerText());

  // 5. The drill report appears with its verdict, figures and picture.
  await page.locator("#drills-refresh").click();
  const row = page.locator(`#drills tr[data-run="${run}"]`);
  await row.waitFor({ timeout: WAIT });
  const rowText = await row.innerText();
  if (!rowText.includes("pass")) throw new Error(`the drill row shows no verdict: ${rowText}`);
  await row.locator("a").click();
  const img = page.locator("#drill-detail img.picture");
  await img.waitFor({ timeout: WAIT });
  await page.waitForFunction(() => {
    const i = document.querySelector("#drill-detail img.picture");
    return i && i.complete && i.naturalWidth > 0;
  }, null, { timeout: WAIT });
  const detail = await page.locator("#drill-detail").innerText();
  await page.locator("#drills-section").screenshot({ path: join(shots, "console-drills.png") });
  if (pageErrors.length) throw new Error(`errors in the page: ${pageErrors.join("; ")}`);
  if (leaks.length) throw new Error(`the admin key appeared in a URL: ${leaks.length} requests`);
  await step("drill-shown", detail.replace(/\s+/g, " "));
} catch (e) {
  process.stderr.write(`console drive failed: ${e?.stack ?? e}\n`);
  exitCode = 1;
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(exitCode);
