// Drives ComfyUI's real frontend in headless Chromium (playwright-core, Debian's chromium).
//   node frontend.cjs <server url> to-api     <ui workflow.json>  <out api.json>
//   node frontend.cjs <server url> from-api   <api prompt.json>   <out ui.json>   [note text file]
//   node frontend.cjs <server url> screenshot <ui workflow.json>  <out .png>
//   node frontend.cjs <server url> run        <ui workflow.json>  <out .png>  (queues it as a user would,
//        waits for the run, prints {node id: {type, text}} of every node's result box, then screenshots)
const fs = require('fs');
const { chromium } = require('playwright-core');

const [url, mode, input, output, noteFile] = process.argv.slice(2);
const executablePath = process.env.PRIVDIFF_CHROMIUM || '/usr/bin/chromium';
const flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

(async () => {
  const browser = await chromium.launch({ executablePath, args: flags });
  try {
    // Screenshots get a large canvas so that node titles and widgets stay legible in the README.
    const viewport = (mode === 'screenshot' || mode === 'run') ? { width: 2400, height: 1350 } : { width: 1600, height: 900 };
    const page = await browser.newPage({ viewport });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(url, { waitUntil: 'load', timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.vueAppReady !== false, null,
      { timeout: 120000 });
    await page.waitForTimeout(1500); // node definitions registered
    const data = JSON.parse(fs.readFileSync(input, 'utf8'));
    if (mode === 'to-api') {
      const prompt = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        return (await window.app.graphToPrompt()).output;
      }, data);
      fs.writeFileSync(output, JSON.stringify(prompt, null, 1));
    } else if (mode === 'from-api') {
      const note = noteFile ? fs.readFileSync(noteFile, 'utf8') : null;
      const workflow = await page.evaluate(async ([api, note]) => {
        await window.app.loadApiJson(api, 'workflow');
        const graph = window.app.graph;
        if (note) {
          const node = window.LiteGraph.createNode('Note');
          node.widgets[0].value = note;
          let left = Infinity, bottom = -Infinity;
          for (const n of graph._nodes) { left = Math.min(left, n.pos[0]); bottom = Math.max(bottom, n.pos[1] + n.size[1]); }
          node.pos = [left, bottom + 300];  // below the nodes, with room for their results after a run
          node.size = [520, 160];
          graph.add(node);
        }
        return graph.serialize();
      }, [data, note]);
      fs.writeFileSync(output, JSON.stringify(workflow, null, 1) + '\n');
    } else if (mode === 'screenshot' || mode === 'run') {
      await page.evaluate(async ([wf, width, height, run]) => {
        await window.app.loadGraphData(wf);
        if (run) {
          const before = Object.keys(await (await fetch('/history')).json()).length;
          await window.app.queuePrompt(0, 1);
          for (let i = 0; i < 3600; i++) {  // at most an hour
            await new Promise((r) => setTimeout(r, 1000));
            const queue = await (await fetch('/queue')).json();
            const done = Object.keys(await (await fetch('/history')).json()).length > before;
            if (done && !queue.queue_running.length && !queue.queue_pending.length) break;
          }
          await new Promise((r) => setTimeout(r, 1500));  // the last 'executed' messages reach the nodes
        }
        const canvas = window.app.canvas;
        canvas.min_font_size_for_lod = 0;  // draw titles and widgets at any zoom (no low-detail boxes)
        if (canvas.ds && window.app.graph._nodes.length) {
          let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
          for (const n of window.app.graph._nodes) {
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
          }
          const scale = Math.min(1.1, (width - 150) / (x1 - x0), (height - 200) / (y1 - y0));
          canvas.ds.scale = scale;
          canvas.ds.offset = [-x0 + 50 / scale, -y0 + 80 / scale];
          canvas.setDirty(true, true);
        }
      }, [data, viewport.width, viewport.height, mode === 'run']);
      await page.keyboard.press('Escape');  // a fresh ComfyUI opens its template dialog over the graph
      await page.waitForTimeout(1500);
      await page.screenshot({ path: output });
      if (mode === 'run') {
        const results = await page.evaluate(() => {
          const out = {};
          for (const n of window.app.graph._nodes) {
            const w = (n.widgets || []).find((w) => w.name === 'privdiff_result');
            if (w) out[n.id] = { type: n.type, text: w.value };
          }
          return out;
        });
        console.log(JSON.stringify(results));
      }
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
    if (errors.length) console.error('page errors:\n' + errors.join('\n'));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
