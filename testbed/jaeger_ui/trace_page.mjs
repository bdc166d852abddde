// Opens a Jaeger UI trace page in Debian's chromium and expands the first `tcp connect` span
// the way a user would: a screenshot of the page with every log of the span shown, then, with
// its tags table opened too, one JSON line: {"text": "...", "rows": [...]}, the page's rendered
// text and the span rows of the trace view, top to bottom, each as
// {"service", "operation", "ancestors", "parent"}: the ids of the spans it is indented under
// (the view's indent guides, the trace's root first) and whether it can be collapsed.
//
// usage: node trace_page.mjs URL SCREENSHOT.png
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error('usage: node trace_page.mjs URL SCREENSHOT.png');
  process.exit(2);
}
const timeout = 20000;
const browser = await chromium.launch({
  executablePath: process.env.SYNSPAN_CHROMIUM || '/usr/bin/chromium',
  // Root in CI: chromium's sandbox needs user namespaces it cannot have there.
  args: ['--no-sandbox', '--disable-gpu'],
  timeout,
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(timeout);
  await page.goto(url);
  const connect = page.locator('.span-name', {
    has: page.locator('.endpoint-name', { hasText: /^tcp connect$/ }),
  });
  await connect.first().waitFor();
  // Read before the detail row opens: it is a row of the view too, but no span's.
  const rows = await page.locator('.span-row').evaluateAll((rows) =>
    rows.map((row) => ({
      service: row.querySelector('.span-svc-name')?.innerText.trim() ?? '',
      operation: row.querySelector('.endpoint-name')?.innerText.trim() ?? '',
      ancestors: [...row.querySelectorAll('.SpanTreeOffset--indentGuide')].map(
        (guide) => guide.dataset.ancestorId,
      ),
      parent: row.querySelector('.SpanTreeOffset.is-parent') !== null,
    })),
  );
  await connect.first().click();
  const detail = page.locator('.detail-row').first();
  const more = detail.locator('.AccordianLogs--toggle', { hasText: 'show more' });
  if (await more.count()) {
    await more.click();
  }
  // Down to the span's details, not the empty page below them.
  const box = await detail.boundingBox();
  const height = Math.min(900, Math.ceil(box.y + box.height) + 8);
  await page.screenshot({ path: screenshot, clip: { x: 0, y: 0, width: 1400, height } });
  // The tags table scrolls the page: opened after the picture, for the text only.
  await detail.locator('.AccordianKeyValues--header', { hasText: 'Tags' }).click();
  console.log(JSON.stringify({ text: await page.locator('body').innerText(), rows }));
} finally {
  await browser.close();
}
