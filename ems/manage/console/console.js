// EMS console: reads the management API with requests signed in the browser
// (HMAC-SHA256, as ems/manage/signing.py defines). No build step and no external script.
"use strict";

const STORE = window.sessionStorage;
const encoder = new TextEncoder();

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function sha256Hex(text) {
  return hex(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
}

async function hmacHex(secret, text) {
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return hex(await crypto.subtle.sign("HMAC", key, encoder.encode(text)));
}

// Percent-encode as Python's urllib.parse.quote(safe="-_.~") does.
function encode(text) {
  return encodeURIComponent(text).replace(/[!'()*]/g,
    (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

function canonicalQuery(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => [String(k), String(v)]);
  // Sorted by name, then value. JavaScript compares UTF-16 code units and Python code
  // points: the orders differ only for characters outside the Basic Multilingual Plane.
  pairs.sort((a, b) => {
    if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
    if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
    return 0;
  });
  return pairs.map(([k, v]) => `${encode(k)}=${encode(v)}`).join("&");
}

function nonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(18));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function call(method, path, params = {}) {
  const keyId = STORE.getItem("ems.key");
  const secret = STORE.getItem("ems.secret");
  const query = canonicalQuery(params);
  const timestamp = String(Math.floor(Date.now() / 1000));
  const once = nonce();
  const text = ["EMS-HMAC-SHA256", method, path, query, await sha256Hex(""), timestamp, once,
    keyId].join("\n");
  const response = await fetch(path + (query ? `?${query}` : ""), {
    method,
    headers: {
      "X-EMS-Key-Id": keyId, "X-EMS-Timestamp": timestamp, "X-EMS-Nonce": once,
      "X-EMS-Signature": await hmacHex(secret, text),
    },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${method} ${path}: HTTP ${response.status}: ${body.reason || "no reason"}`);
  }
  return body;
}

// ---- formatting ---------------------------------------------------------------------------

const UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB"];

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  if (bytes < 1024) return `${bytes} B`;
  let value = bytes;
  for (const unit of UNITS) {
    value /= 1024;
    if (value < 1024 || unit === UNITS[UNITS.length - 1]) return `${value.toFixed(1)} ${unit}`;
  }
  return `${bytes} B`;
}

function percent(ratio) {
  return ratio === null || ratio === undefined ? "-" : `${(100 * ratio).toFixed(1)}%`;
}

function utc(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") : "-";
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = element("tr");
  for (const cell of cells) tr.append(cell instanceof Node ? cell : element("td", cell));
  return tr;
}

function field(name, value, text, extra = {}) {
  return element("td", text, { "data-field": name, "data-value": String(value), ...extra });
}

// ---- rendering ----------------------------------------------------------------------------

function setField(name, text, value) {
  const node = document.querySelector(`[data-field="${name}"]`);
  node.textContent = text;
  node.setAttribute("data-value", String(value === undefined ? text : value));
  return node;
}

function renderAccount(account) {
  document.getElementById("who").textContent = `${account.name} (${account.id})`;
  setField("account", `${account.name} (${account.id})`, account.id);
  setField("price", account.price_per_node_hour);
  setField("balance", account.balance);
  setField("bill_due", account.bill_due);
  const standing = setField("standing", account.in_arrears
    ? "In arrears: clusters do not serve until a top-up covers the bill"
    : "In good standing", account.in_arrears ? "arrears" : "good");
  standing.className = account.in_arrears ? "bad" : "good";
}

function renderBill(bill) {
  setField("month", `(${bill.month})`, bill.month);
  setField("bill_node_hours", bill.node_hours);
  setField("bill_total", bill.total);
  const body = document.getElementById("bill");
  body.replaceChildren();
  for (const item of bill.items) {
    body.append(row([
      element("td", `${item.hour.slice(0, 16).replace("T", " ")} - ${item.hour_end.slice(11, 16)}`),
      element("td", item.cluster_name),
      element("td", item.samples, { class: "number" }),
      element("td", item.node_sum, { class: "number" }),
      field("node_hours", item.node_hours, item.node_hours, { class: "number" }),
      field("amount", item.amount, item.amount, { class: "number" }),
    ]));
  }
  if (!bill.items.length) body.append(row([element("td", "nothing metered yet", { colspan: 6, class: "muted" })]));
}

function nodeTable(nodes) {
  const table = element("table");
  table.append(row(["Node", "Address", "State", "Tier", "Capacity", "Used", "Blocks",
    "Hit ratio"].map((text) => element("th", text))));
  for (const node of nodes) {
    const tiers = node.tiers.length ? node.tiers : [{ tier: "-" }];
    tiers.forEach((tier, i) => {
      const tr = row([
        element("td", i ? "" : node.node_id),
        element("td", i ? "" : node.address),
        i ? element("td", "") : field("state", node.state, node.error ? `${node.state || "?"} (${node.error})` : node.state,
          { class: node.serving ? "good" : "bad" }),
        element("td", tier.tier),
        field("capacity", tier.capacity_bytes, size(tier.capacity_bytes), { class: "number" }),
        field("used", tier.used_bytes, size(tier.used_bytes), { class: "number" }),
        field("blocks", tier.blocks, tier.blocks ?? "-", { class: "number" }),
        i ? element("td", "") : field("hit_ratio", node.hit_ratio, percent(node.hit_ratio), { class: "number" }),
      ]);
      tr.setAttribute("data-node", node.node_id);
      tr.setAttribute("data-tier", tier.tier);
      table.append(tr);
    });
  }
  return table;
}

async function renderClusters(clusters) {
  const box = document.getElementById("clusters");
  box.replaceChildren();
  if (!clusters.length) box.append(element("p", "No clusters yet: `ems cluster create`.", { class: "muted" }));
  for (const cluster of clusters) {
    const section = element("div", null, { "data-cluster": cluster.id });
    const state = cluster.deleted ? `deleted ${utc(cluster.deleted)}`
      : cluster.activated ? `activated ${utc(cluster.activated)}` : "not activated yet";
    section.append(element("h3", `${cluster.name} (${cluster.id}) on ZooKeeper ${cluster.zookeeper}: ${state}`));
    if (!cluster.deleted) {
      const nodes = await call("GET", `/v1/clusters/${cluster.id}/nodes`);
      if (nodes.error) section.append(element("p", nodes.error, { class: "bad" }));
      section.append(nodeTable(nodes.nodes));
    }
    box.append(section);
  }
}

async function render() {
  const status = document.getElementById("status");
  status.setAttribute("data-state", "loading");
  status.textContent = "Loading...";
  try {
    const [account, bill, clusters] = await Promise.all([
      call("GET", "/v1/account"), call("GET", "/v1/bill"), call("GET", "/v1/clusters")]);
    renderAccount(account);
    renderBill(bill);
    await renderClusters(clusters.clusters);
    document.getElementById("main").hidden = false;
    status.setAttribute("data-state", "ready");
    status.textContent = `Updated ${new Date().toISOString().slice(0, 19).replace("T", " ")} UTC`;
  } catch (error) {
    status.setAttribute("data-state", "error");
    status.textContent = error.message;
  }
}

// ---- sign-in ------------------------------------------------------------------------------

function signedIn() {
  return STORE.getItem("ems.key") && STORE.getItem("ems.secret");
}

function showSignIn() {
  document.getElementById("signin").hidden = false;
  document.getElementById("main").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("refresh").hidden = true;
  const status = document.getElementById("status");
  status.setAttribute("data-state", "signed-out");
  status.textContent = "";
}

function start() {
  // A key passed in the fragment (#key=...&secret=..., for automation) is moved into
  // session storage and removed from the address bar; fragments never reach the server.
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  if (fragment.get("key") && fragment.get("secret")) {
    STORE.setItem("ems.key", fragment.get("key"));
    STORE.setItem("ems.secret", fragment.get("secret"));
    history.replaceState(null, "", window.location.pathname);
  }
  document.getElementById("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    STORE.setItem("ems.key", document.getElementById("key").value.trim());
    STORE.setItem("ems.secret", document.getElementById("secret").value.trim());
    start();
  });
  document.getElementById("signout").onclick = () => { STORE.clear(); showSignIn(); };
  document.getElementById("refresh").onclick = render;
  if (!signedIn()) return showSignIn();
  document.getElementById("signin").hidden = true;
  document.getElementById("signout").hidden = false;
  document.getElementById("refresh").hidden = false;
  return render();
}

start();
