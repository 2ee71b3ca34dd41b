// The graph as SVG: nodes left to right in dataflow order, each a box with its stages, host and device and one
// row per replica; edges as arrows labelled with their transport and bytes per request. showState() then
// colours each replica row by what the service's events say (ready, busy with a stage and step, down).

const SVG = "http://www.w3.org/2000/svg";
const BOX = { width: 260, head: 46, line: 16, row: 24, column: 150, gap: 28, margin: 12 };
const ROW_CHARS = 34;  // what fits in a replica's row; the whole text is its tooltip
const LINE_CHARS = 38;  // what fits in a line of a node's stages

function element(name, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

export function humanBytes(count) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  for (; count >= 1024 && unit < units.length - 1; unit += 1) count /= 1024;
  return `${unit ? count.toFixed(1) : count} ${units[unit]}`;
}

/** A node's stages, as many to a line as fit. */
function stageLines(node) {
  const lines = [];
  for (const stage of node.stages) {
    const last = lines.length - 1;
    if (last >= 0 && `${lines[last]} · ${stage}`.length <= LINE_CHARS) lines[last] += ` · ${stage}`;
    else lines.push(stage);
  }
  return lines;
}

function headHeight(node) {
  return BOX.head + stageLines(node).length * BOX.line;
}

/** Each node's column: the longest chain of edges leading to it. */
function columns(nodes, edges) {
  const column = Object.fromEntries(nodes.map((node) => [node.name, 0]));
  for (let pass = 0; pass < nodes.length; pass += 1) {
    for (const edge of edges) column[edge.to] = Math.max(column[edge.to], column[edge.from] + 1);
  }
  return column;
}

/** Where each node's box goes: {x, y, height}. */
function layout(nodes, edges) {
  const column = columns(nodes, edges);
  const nextY = {};
  const boxes = {};
  for (const node of nodes) {
    const c = column[node.name];
    const height = headHeight(node) + node.replicas * BOX.row + 6;
    const y = nextY[c] ?? BOX.margin;
    boxes[node.name] = { x: BOX.margin + c * (BOX.width + BOX.column), y, height };
    nextY[c] = y + height + BOX.gap;
  }
  return boxes;
}

function drawNode(node, box) {
  const group = element("g", { class: "node", "data-node": node.name, transform: `translate(${box.x},${box.y})` });
  group.append(
    element("rect", { class: "box", width: BOX.width, height: box.height, rx: 8 }),
    element("text", { class: "name", x: 12, y: 20 }, node.name),
    element("text", { class: "where", x: 12, y: 37 }, `${node.host} · ${node.device}`),
    ...stageLines(node).map((line, i) => element("text", { class: "stages", x: 12, y: 53 + i * BOX.line }, line)),
  );
  for (let replica = 0; replica < node.replicas; replica += 1) {
    const row = element("g", { class: "replica", "data-node": node.name, "data-replica": replica,
                               "data-state": "starting", transform: `translate(8,${headHeight(node) + replica * BOX.row})` });
    row.append(element("rect", { width: BOX.width - 16, height: BOX.row - 4, rx: 4 }),
               element("text", { x: 8, y: 14 }, `[${replica}] starting`), element("title", {}, ""));
    group.append(row);
  }
  return group;
}

function drawEdge(edge, boxes) {
  const from = boxes[edge.from];
  const to = boxes[edge.to];
  const [x1, y1] = [from.x + BOX.width, from.y + from.height / 2];
  const [x2, y2] = [to.x, to.y + to.height / 2];
  const bend = (x2 - x1) / 2;
  const group = element("g", { class: "edge", "data-edge": edge.name });
  group.append(element("path", { d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2 - 6},${y2}`,
                                 "marker-end": "url(#arrow)" }));
  const [mx, my] = [(x1 + x2) / 2, (y1 + y2) / 2];
  const transport = edge.protocol ? `${edge.transport}/${edge.protocol}` : edge.transport;
  group.append(
    element("text", { x: mx, y: my - 20, "text-anchor": "middle", class: "edge-name" }, `${edge.name} · ${transport}`),
    element("text", { x: mx, y: my - 6, "text-anchor": "middle" }, `${humanBytes(edge.bytes_per_request)} / request`),
    element("title", {}, `${edge.tensors.join(", ")}\nslot ${humanBytes(edge.slot_bytes)} (largest request)`),
  );
  return group;
}

function arrowHead() {
  const defs = element("defs");
  const marker = element("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 2, refY: 5, markerWidth: 8,
                                     markerHeight: 8, orient: "auto-start-reverse" });
  marker.append(element("path", { d: "M0,0 L10,5 L0,10 z" }));
  defs.append(marker);
  return defs;
}

export function drawGraph(svg, service) {
  const boxes = layout(service.nodes, service.edges);
  const width = Math.max(...Object.values(boxes).map((b) => b.x + BOX.width)) + BOX.margin;
  const height = Math.max(...Object.values(boxes).map((b) => b.y + b.height)) + BOX.margin;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.replaceChildren(arrowHead(), ...service.edges.map((edge) => drawEdge(edge, boxes)),
                      ...service.nodes.map((node) => drawNode(node, boxes[node.name])));
}

function describeReplica(replica) {
  const name = `[${replica.replica}]`;
  if (replica.state === "down") return `${name} down: ${replica.down}`;
  if (replica.state !== "busy") return `${name} ${replica.state}`;
  const step = replica.total_steps ? ` ${replica.step}/${replica.total_steps}` : "";
  return `${name} busy · ${replica.stage ?? "dispatched"}${step}`;
}

/** Show each replica's state as the service's `state` event gives it. */
export function showState(svg, state) {
  const running = new Set(state.replicas.map((replica) => `${replica.node}[${replica.replica}]`));
  for (const row of svg.querySelectorAll("g.replica")) {  // an elastic node's rows beyond its replicas now
    if (!running.has(`${row.dataset.node}[${row.dataset.replica}]`)) {
      row.dataset.state = "absent";
      row.querySelector("text").textContent = `[${row.dataset.replica}] not running`;
    }
  }
  for (const replica of state.replicas) {
    const row = svg.querySelector(`g.replica[data-node="${replica.node}"][data-replica="${replica.replica}"]`);
    if (!row) continue;
    const text = describeReplica(replica);
    row.dataset.state = replica.state;
    row.dataset.stage = replica.stage ?? "";
    row.querySelector("text").textContent = text.length > ROW_CHARS ? `${text.slice(0, ROW_CHARS - 1)}…` : text;
    const details = [text, replica.job && `job ${replica.job}`, replica.pid && `pid ${replica.pid}`];
    row.querySelector("title").textContent = details.filter(Boolean).join("\n");
  }
}

/** The service does not answer: no replica's state is known any more (none stays green). Each row says what it
 * was last; the next `state` event shows them again. */
export function markStale(svg) {
  for (const row of svg.querySelectorAll("g.replica")) {
    if (row.dataset.state === "unknown") continue;
    const last = row.dataset.state;
    row.dataset.state = "unknown";
    row.dataset.stage = "";
    row.querySelector("text").textContent = `[${row.dataset.replica}] unknown (was ${last})`;
    const title = row.querySelector("title");
    title.textContent = `no news: the service does not answer\nlast known: ${title.textContent || last}`;
  }
}
