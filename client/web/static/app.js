// The operator's viewer page. Everything it shows was verified and decrypted by the local
// fusion-client process; this page only lays out, plays (Media Source Extensions) and asks.
// No build step, no third-party code: plain DOM and MSE.
"use strict";

const LIVE_EDGE_S = 2;         // live: jump to the newest segment when further behind than this
const CATCH_UP_S = 0.02;       // live: play faster when the newest segment starts further
                               // ahead of the playhead than this (a late segment stalled it)
const RELAX_S = 0.15;          // ... back to real time with this little media left
const MAX_RATE = 1.5;          // ... at most this fast (people still see the motion)
const KEEP_BEHIND_S = 60;      // media kept behind the playhead (MSE memory is bounded)

// A playback request covers windowMs of recording; the next window follows when it ends.
const viewer = { tiles: new Map(), cameras: new Map(), info: null, windowMs: 120000 };
const GAP_MS = 1000;           // as the player: more than this between one segment's end and
                               // the next one's start is a gap (signed times)
const MIN_GAP_MS = 5000;       // segments without a signed duration: a jump this long
window.fusionViewer = viewer;  // read by the browser tests and handy in the console

function fmt(ms) {
  if (ms == null) return "–";
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function toLocalInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}
function fromLocalInput(value) {
  const ms = new Date(value).getTime();  // datetime-local values are local time
  return Number.isFinite(ms) ? ms : null;
}

// The session secret lives in this closure only: no cookie, no storage, nothing the browser
// would send on its own. Every other local web server is the "same site" to a browser (ports
// do not count), so an ambient credential would reach them all.
const session = (() => {
  // The one-time launch token comes in the URL's fragment, which no server ever receives;
  // it is dropped from the address bar and history at once.
  const launch = new URLSearchParams(location.hash.slice(1)).get("token");
  if (location.hash) history.replaceState(null, "", location.pathname);
  let secret = null;
  return {
    launch,
    async open() {
      const response = await fetch("/api/session", {
        method: "POST", credentials: "omit", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ launch }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok || !body.secret) throw new Error(body.message || `HTTP ${response.status}`);
      secret = body.secret;
    },
    headers(extra = {}) { return { ...extra, Authorization: `Bearer ${secret}` }; },
    // A WebSocket cannot carry a header: the secret is its first message (never in its URL,
    // which lands in logs and history).
    opening(params) { return JSON.stringify({ secret, ...params }); },
  };
})();

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, credentials: "omit",
                                       headers: session.headers(options.headers) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
  return body;
}

class Tile {
  constructor(camera) {
    this.camera = camera;
    const node = document.getElementById("tile-template").content.firstElementChild.cloneNode(true);
    this.el = node;
    node.dataset.camera = camera;
    this.q = (sel) => node.querySelector(sel);
    this.video = this.q("video");
    this.canvas = this.q(".timeline");
    this.q(".name").textContent = camera;
    this.gaps = [];               // {from_ms, to_ms, kind, text}: learned while playing
    this.switches = [];           // a range across a change of Archiver: where it switched
    this.selection = null;        // [from_ms, to_ms] chosen by dragging
    this.userPaused = false;
    this.q(".live").onclick = () => this.playLive();
    this.q(".pause").onclick = () => this.togglePause();
    this.q(".close").onclick = () => this.close();
    this.q(".go").onclick = () => {
      const ms = fromLocalInput(this.q(".jump").value);
      if (ms != null) this.playFrom(ms);
    };
    this.q(".export").onclick = () => this.exportRange();
    this.video.addEventListener("play", () => {
      if (this.stopped) this.video.pause();  // a failed stream never plays on
    });
    this.setupTimeline();
    this.watchFrames();
    document.getElementById("grid").appendChild(node);
    this.reset();
  }

  // --- state shown to the operator ---------------------------------------------------
  setState(kind, text) {
    const el = this.q(".state");
    el.dataset.state = kind;
    el.textContent = text;
    this.el.dataset.state = kind;
  }
  overlay(kind, text) {
    const el = this.q(".overlay");
    el.hidden = !text;
    el.className = `overlay ${kind || ""}`;
    el.textContent = text || "";
  }
  snapshot() {
    return {
      camera: this.camera, live: this.live, state: this.el.dataset.state,
      stateText: this.q(".state").textContent, stopped: this.stopped, error: this.error,
      code: this.code, codec: this.codec, verified: this.verifiedCount, shown: this.segments.length,
      currentTime: this.video.currentTime, paused: this.video.paused,
      positionMs: this.positionMs(), gaps: this.gaps, switches: this.switches,
      firstFrames: this.firstFrames,
      timing: this.timing, requests: this.requests, followLive: this.followLive,
      playbackRate: this.video.playbackRate,
      segments: this.segments.map((s) => ({ seq: s.seq, capture_ms: s.capture_ms,
                                            duration_ms: s.duration_ms, start: s.start,
                                            end: s.end })),
    };
  }

  // --- streams -----------------------------------------------------------------------
  reset() {
    // A new stream: anything still in flight for the old one (an open() waiting for its
    // MediaSource, an append, the old SourceBuffer's last updateend) must not touch it.
    this.generation = (this.generation || 0) + 1;
    if (this.ws) { this.ws.onmessage = this.ws.onclose = null; this.ws.close(); }
    this.ws = null;
    this.appending = null;
    this.timing = {};             // seq -> {received, appended, behind}: wall-clock ms
    this.followLive = true;       // live: keep the playhead at the newest segment
    this.video.playbackRate = 1;
    this.segments = [];           // appended media: {seq, capture_ms, duration_ms, start, end}
    this.firstFrames = {};        // seq -> wall-clock ms its first frame was on screen
    this.pending = [];            // [meta, ArrayBuffer] waiting for the SourceBuffer
    this.meta = null;             // the segment whose bytes come next
    this.sb = null;
    this.codec = null;
    this.stopped = false;
    this.error = null;
    this.code = null;
    this.verifiedCount = 0;
    this.seekTo = null;
    this.overlay(null, "");
    if (this.video.src) { URL.revokeObjectURL(this.video.src); }
    this.ms = new MediaSource();
    this.msOpen = new Promise((resolve) =>
      this.ms.addEventListener("sourceopen", resolve, { once: true }));
    this.video.src = URL.createObjectURL(this.ms);
  }

  playLive() {
    this.reset();
    this.live = true;
    this.q(".mode").textContent = "live";
    this.setState("info", "connecting to the live stream…");
    this.open({ mode: "live" });
  }

  playFrom(ms) {
    if (this.seekBuffered(ms)) return;
    const cam = viewer.cameras.get(this.camera);
    this.reset();
    this.live = false;
    this.q(".mode").textContent = `playback from ${fmt(ms)}`;
    this.setState("info", `loading the recording from ${fmt(ms)}…`);
    this.seekTo = ms;
    this.windowEnd = ms + viewer.windowMs;
    this.lastRecorded = cam && cam.last_ms != null ? cam.last_ms : ms;
    this.lastCapture = null;
    this.lastEnd = null;
    this.intervals = [];
    this.open({ mode: "range", from_ms: ms, to_ms: this.windowEnd, start_ms: ms });
  }

  seekBuffered(ms) {
    // A moment whose media is in the SourceBuffer already (verified when it came) is shown
    // from there: no new request to the Archiver. Anything else starts a new stream.
    if (this.stopped || !this.sb || this.ms.readyState === "closed") return false;
    const seg = this.segments.find((s) => {
      const length = s.duration_ms ? s.duration_ms : (s.end - s.start) * 1000;
      return ms >= s.capture_ms && ms < s.capture_ms + length;
    });
    if (!seg) return false;
    const t = Math.min(seg.start + (ms - seg.capture_ms) / 1000, seg.end - 0.01);
    const b = this.sb.buffered;
    let held = false;
    for (let i = 0; i < b.length; i++) held = held || (b.start(i) <= t && t < b.end(i));
    if (!held) return false;  // dropped behind the playhead (KEEP_BEHIND_S) already
    if (this.live) {
      // Looking back while the live stream goes on: stop following the live edge until the
      // operator presses Live again.
      this.followLive = false;
      this.video.playbackRate = 1;
      this.q(".mode").textContent = `live, watching ${fmt(ms)}`;
    } else {
      this.q(".mode").textContent = `playback from ${fmt(ms)}`;
    }
    this.video.currentTime = t;
    return true;
  }

  nextWindow() {
    // From where the last segment shown ends, so one spanning the boundary is not shown twice.
    const from = Math.max(this.windowEnd + 1, this.lastEnd || 0);
    this.windowEnd = from + viewer.windowMs;
    this.windowStart = true;
    if (this.ws) { this.ws.onmessage = this.ws.onclose = null; this.ws.close(); }
    this.open({ mode: "range", from_ms: from, to_ms: this.windowEnd, start_ms: from });
  }

  noteCapture(ms, duration) {
    // The player reports gaps inside one request; across windows the page does, the same way:
    // exactly from signed start and duration, else from a jump well beyond the usual spacing.
    if (this.lastCapture != null && this.windowStart) {
      if (this.lastEnd > this.lastCapture) {
        if (ms - this.lastEnd > GAP_MS) {
          this.addGap({ type: "gap", kind: "none", from_ms: this.lastEnd, to_ms: ms,
                        segments: 0, text: "no recording" });
        }
      } else {
        const sorted = [...this.intervals].sort((x, y) => x - y);
        const typical = sorted.length ? sorted[Math.floor(sorted.length / 2)] : 0;
        if (ms - this.lastCapture > Math.max(MIN_GAP_MS, 3 * typical)) {
          this.addGap({ type: "gap", kind: "none", from_ms: this.lastCapture, to_ms: ms,
                        segments: 0, text: "no recording" });
        }
      }
    } else if (this.lastCapture != null) {
      this.intervals.push(ms - this.lastCapture);
      if (this.intervals.length > 16) this.intervals.shift();
    }
    this.lastCapture = ms;
    this.lastEnd = ms + (duration || 0);
    this.windowStart = false;
  }

  async open(params) {
    const generation = this.generation;
    await this.msOpen;
    if (generation !== this.generation) return;  // reset (a seek, Live) while waiting
    this.requests = (this.requests || 0) + 1;     // streams asked of the local viewer
    const ws = new WebSocket(`ws://${location.host}/api/stream`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => ws.send(session.opening({ camera: this.camera, ...params }));
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onclose = () => {
      if (this.ws === ws && !this.stopped && !this.ended) {
        this.fail("The connection to the local viewer closed before the stream ended.");
      }
    };
    this.ended = false;
  }

  onMessage(data) {
    if (this.stopped) return;
    if (data instanceof ArrayBuffer) {
      if (this.meta) {
        this.timing[this.meta.seq] = { received: Date.now() };
        this.pending.push([this.meta, data]);
        this.meta = null;
        this.pump();
      }
      return;
    }
    const msg = JSON.parse(data);
    if (msg.type === "codec") return this.onCodec(msg);
    if (msg.type === "segment") {
      this.verifiedCount += 1;
      if (!this.live) this.noteCapture(msg.capture_ms, msg.duration_ms);
      const when = fmt(msg.capture_ms);
      this.setState(this.codec === "unsupported" ? "unsupported" : "verified",
        `✔ verified: ${this.verifiedCount} segment(s) checked against the Archiver's signed ` +
        `manifests; last #${msg.seq} captured ${when}` +
        (this.codec === "unsupported" ? " (not shown: codec)" : ""));
      if (msg.media) this.meta = msg;
      return;
    }
    if (msg.type === "gap") return this.addGap(msg);
    if (msg.type === "switch") return this.onSwitch(msg);
    if (msg.type === "end") return this.onEnd(msg);
    if (msg.type === "error") return this.onError(msg);
  }

  onSwitch(msg) {
    // The recording went on at another Archiver (a move or a failover): its part is verified
    // against that Archiver's own signature; the gap between the signed edges is drawn.
    if (!this.switches.some((w) => w.text === msg.text)) this.switches.push(msg);
    this.q(".mode").textContent = `playback, now from Archiver ${msg.to_archiver}`;
    this.q(".mode").title = msg.text;
  }

  addGap(gap) {
    // Gaps stay on the timeline once seen; playing the same range again adds nothing new.
    if (!this.gaps.some((g) => g.kind === gap.kind && g.from_ms === gap.from_ms &&
                               g.to_ms === gap.to_ms)) {
      this.gaps.push(gap);
    }
    this.draw();
  }

  onCodec(msg) {
    if (this.sb || this.codec === "unsupported") return;
    if (!msg.mime || !MediaSource.isTypeSupported(msg.mime)) {
      this.codec = "unsupported";
      const name = msg.codec === "hevc" ? "H.265" : msg.codec;
      this.overlay("unsupported", `This browser cannot decode ${name} video. The stream is ` +
        "still verified here, and export works: export the range and play the file with " +
        "ffplay or VLC.");
      return;
    }
    this.codec = msg.codec;
    const sb = this.ms.addSourceBuffer(msg.mime);
    this.sb = sb;
    // Segments follow each other whatever their own timestamps: the page keeps the mapping.
    sb.mode = "sequence";
    // A SourceBuffer of a stream reset since ends with an updateend too: not ours any more.
    sb.addEventListener("updateend", () => { if (sb === this.sb) this.pump(); });
  }

  pump() {
    if (!this.sb || this.sb.updating) return;
    if (this.appending) {
      const [meta, start] = this.appending;
      this.appending = null;
      const b = this.sb.buffered;
      const end = b.length ? b.end(b.length - 1) : start;
      this.segments.push({ seq: meta.seq, capture_ms: meta.capture_ms,
                           duration_ms: meta.duration_ms, start, end });
      if (this.timing[meta.seq]) {
        this.timing[meta.seq].appended = Date.now();
        this.timing[meta.seq].behind = +(start - this.video.currentTime).toFixed(3);
      }
      this.afterAppend();
    }
    if (this.trim()) return;
    const next = this.pending.shift();
    if (!next) {
      if (this.ended && this.ms.readyState === "open") this.ms.endOfStream();
      return;
    }
    const b = this.sb.buffered;
    this.appending = [next[0], b.length ? b.end(b.length - 1) : 0];
    try {
      this.sb.appendBuffer(next[1]);
    } catch (err) {
      this.appending = null;
      this.fail(`The browser refused the video (${err.name}); playback stopped.`);
    }
  }

  trim() {
    // Drop media far behind the playhead so long viewing stays within MSE's memory quota.
    const b = this.sb.buffered;
    if (b.length && this.video.currentTime - b.start(0) > KEEP_BEHIND_S * 2) {
      this.sb.remove(0, this.video.currentTime - KEEP_BEHIND_S);
      return true;
    }
    return false;
  }

  afterAppend() {
    const first = this.segments.length === 1;
    const seg = this.segments[this.segments.length - 1];
    if (first) {
      let at = seg.start;
      if (this.seekTo != null) {
        // A segment starts at its (signed) capture time: the wanted moment lies that far in.
        const into = Math.max(0, this.seekTo - seg.capture_ms) / 1000;
        at = Math.min(seg.start + into, Math.max(seg.start, seg.end - 0.05));
      }
      this.video.currentTime = at;
      if (!this.userPaused) this.video.play().catch(() => {});
    } else if (this.live && this.followLive && !this.userPaused) {
      this.catchUp(seg);
    }
    this.draw();
  }

  catchUp(seg) {
    // Live: the newest segment's first frame is on screen when the playhead reaches its
    // start. A segment that came late stalled playback, and every later one would be shown
    // that much later: play the media before it faster (or, far behind, skip to it).
    const behind = seg.start - this.video.currentTime;
    if (behind > LIVE_EDGE_S) {
      this.video.currentTime = seg.start;
      this.video.playbackRate = 1;
    } else if (behind > CATCH_UP_S) {
      const span = Math.max(0.25, seg.end - seg.start);  // until the next one should arrive
      this.video.playbackRate = Math.min(MAX_RATE, 1 + behind / span);
    } else {
      this.video.playbackRate = 1;
    }
  }

  onEnd(msg) {
    if (!this.live && this.windowEnd < this.lastRecorded) {
      this.nextWindow();  // the next window of the recording, appended to the same media
      return;
    }
    if (this.live) {  // a live request lasts an hour; go on with a new one
      this.ws.onclose = null;
      this.open({ mode: "live" });
      return;
    }
    this.ended = true;
    const unsupported = this.codec === "unsupported";
    this.setState(unsupported ? "unsupported" : "verified",
      `✔ verified to the end: ${this.verifiedCount} segment(s); ` +
      "the Archiver's signed end record checked" + (unsupported ? " (not shown: codec)" : ""));
    this.pump();
  }

  // A failure carries the CLIs' exit code and its name (keyservice.exitcodes.ExitCode, listed
  // in docs/client.md) and the one sentence the CLIs would print.
  onError(msg) {
    if (msg.error === "RECORDING_EXPIRED") {
      this.ended = true;
      this.setState("info", `Expired: ${msg.message}`);
      return;
    }
    if (msg.error === "NO_RECORDING") {
      if (!this.live && this.windowEnd < this.lastRecorded) {
        this.nextWindow();  // nothing in this window: go on to where recording resumes
        return;
      }
      this.ended = true;
      this.setState("info", `No recording there: ${msg.message}`);
      return;
    }
    this.fail(`${msg.message} Playback stopped ${msg.where}.`, msg);
  }

  fail(reason, msg = null) {
    // Nothing after the failure is played: the stream is closed and the video paused for good.
    this.stopped = true;
    this.error = msg ? msg.error : "Connection";  // the exit code's name, or a local failure
    this.code = msg ? msg.code : null;
    this.pending = [];
    if (this.ws) { this.ws.onmessage = this.ws.onclose = null; this.ws.close(); }
    this.video.pause();
    this.setState("failed", `✖ STOPPED: ${reason}`);
    this.overlay("failed", `Playback stopped: ${reason}`);
  }

  togglePause() {
    this.userPaused = !this.userPaused;
    this.q(".pause").textContent = this.userPaused ? "Play" : "Pause";
    if (this.userPaused) this.video.pause();
    else if (!this.stopped) this.video.play().catch(() => {});
  }

  close() {
    this.reset();
    this.el.remove();
    viewer.tiles.delete(this.camera);
  }

  // --- where the playhead is, in capture time ---------------------------------------
  segmentAt(t) {
    return this.segments.find((s) => t >= s.start - 1e-3 && t < s.end + 1e-3) || null;
  }
  positionMs() {
    const seg = this.segmentAt(this.video.currentTime);
    if (!seg) return null;
    return Math.round(seg.capture_ms + (this.video.currentTime - seg.start) * 1000);
  }
  watchFrames() {
    // When each segment's first frame reached the screen (for latency figures).
    const onFrame = (now, meta) => {
      const seg = this.segmentAt(meta.mediaTime);
      if (seg && !(seg.seq in this.firstFrames)) this.firstFrames[seg.seq] = Date.now();
      if (this.video.playbackRate !== 1 && this.sb) {
        // Caught up: little media is left before the live edge; hurrying on would only stall.
        const b = this.sb.buffered;
        const ahead = b.length ? b.end(b.length - 1) - this.video.currentTime : 0;
        if (ahead < RELAX_S) this.video.playbackRate = 1;
      }
      this.video.requestVideoFrameCallback(onFrame);
    };
    this.video.requestVideoFrameCallback(onFrame);
    setInterval(() => this.draw(), 500);
  }

  // --- the timeline ---------------------------------------------------------------------
  span() {
    const cam = viewer.cameras.get(this.camera) || {};
    const now = Date.now();
    const first = cam.first_ms != null ? cam.first_ms : now - 3600000;
    const last = Math.max(cam.last_ms || 0, now);
    const pad = Math.max(1000, (last - first) * 0.02);
    return [first - pad, last + pad];
  }
  msAt(x) {
    const [a, b] = this.span();
    return Math.round(a + (x / this.canvas.clientWidth) * (b - a));
  }
  xAt(ms) {
    const [a, b] = this.span();
    return ((ms - a) / (b - a)) * this.canvas.clientWidth;
  }
  setupTimeline() {
    let down = null;
    this.canvas.addEventListener("mousedown", (e) => { down = e.offsetX; });
    this.canvas.addEventListener("mousemove", (e) => {
      if (down != null && Math.abs(e.offsetX - down) > 4) {
        this.selection = [this.msAt(Math.min(down, e.offsetX)), this.msAt(Math.max(down, e.offsetX))];
        this.draw();
      }
      this.q(".pos").textContent = fmt(this.msAt(e.offsetX));
    });
    this.canvas.addEventListener("mouseup", (e) => {
      if (down == null) return;
      const start = down;
      down = null;
      if (Math.abs(e.offsetX - start) > 4) {
        this.selection = [this.msAt(Math.min(start, e.offsetX)), this.msAt(Math.max(start, e.offsetX))];
        this.q(".ex-from").value = toLocalInput(this.selection[0]);
        this.q(".ex-to").value = toLocalInput(this.selection[1]);
        this.draw();
      } else {
        this.playFrom(this.msAt(e.offsetX));
      }
    });
  }
  draw() {
    const c = this.canvas;
    const w = c.clientWidth;
    if (c.width !== w) c.width = w;
    const g = c.getContext("2d");
    const h = c.height;
    const [a, b] = this.span();
    g.fillStyle = "#0d1014";
    g.fillRect(0, 0, w, h);
    const cam = viewer.cameras.get(this.camera);
    const band = (from, to, color, y = 6, hh = h - 20) => {
      // Whole pixels, at least two wide: a short range stays visible and unblended.
      const x0 = Math.floor(this.xAt(from)), x1 = Math.ceil(this.xAt(to));
      g.fillStyle = color;
      g.fillRect(x0, y, Math.max(2, x1 - x0), hh);
    };
    for (const [from, to] of (cam && cam.ranges) || []) band(from, to, "#347d39");
    for (const [from, to] of (cam && cam.gaps) || []) band(from, to, "#545d68");
    for (const gap of this.gaps) band(gap.from_ms, gap.to_ms, gap.kind === "unauthorized" ? "#c93c37" : gap.kind === "switch" ? "#8957e5" : "#545d68");
    if (this.selection) band(this.selection[0], this.selection[1], "rgba(80,150,255,.55)", 2, h - 12);
    const pos = this.positionMs();
    if (pos != null) band(pos, pos, "#ffffff", 0, h - 10);
    g.fillStyle = "#8b949e";
    g.font = "10px sans-serif";
    g.fillText(fmt(a), 2, h - 2);
    const right = fmt(b);
    g.fillText(right, w - g.measureText(right).width - 2, h - 2);
    this.canvas.dataset.fromMs = a;
    this.canvas.dataset.toMs = b;
  }

  // --- export -----------------------------------------------------------------------------
  async exportRange() {
    const from = fromLocalInput(this.q(".ex-from").value);
    const to = fromLocalInput(this.q(".ex-to").value);
    const msg = this.q(".ex-msg");
    const bar = this.q(".ex-progress");
    msg.className = "ex-msg";
    if (from == null || to == null || to <= from) {
      msg.textContent = "Choose a range: drag on the timeline or fill both times.";
      return;
    }
    bar.hidden = false;
    bar.value = 0;
    msg.textContent = "exporting…";
    try {
      let job = await api("/api/exports", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ camera: this.camera, from_ms: from, to_ms: to }),
      });
      while (job.state === "running") {
        bar.value = job.progress;
        msg.textContent = `exporting: ${job.segments} verified segment(s)`;
        await new Promise((r) => setTimeout(r, 400));
        job = await api(`/api/exports/${job.id}`);
      }
      bar.value = job.progress;
      msg.className = `ex-msg ${job.state}`;
      if (job.state === "done") {
        msg.textContent = `✔ ${job.message} `;
        // A link cannot carry the secret: each click asks for a single-use ticket for this
        // export (valid a minute) and downloads with it.
        const link = document.createElement("a");
        link.href = "#";
        link.className = "download";
        link.textContent = `download ${job.file}`;
        link.onclick = async (event) => {
          event.preventDefault();
          try {
            const ticket = await api(`/api/exports/${job.id}/ticket`, { method: "POST" });
            const once = document.createElement("a");
            once.href = ticket.url;
            once.download = job.file;
            once.click();
          } catch (err) {
            msg.append(` (download refused: ${err.message})`);
          }
        };
        msg.appendChild(link);
      } else {
        msg.textContent = `✖ export failed: ${job.message}`;
      }
    } catch (err) {
      msg.className = "ex-msg failed";
      msg.textContent = `✖ export failed: ${err.message}`;
    }
  }
}

function watch(camera, live = true) {
  let tile = viewer.tiles.get(camera);
  if (!tile) {
    tile = new Tile(camera);
    viewer.tiles.set(camera, tile);
  }
  if (live) tile.playLive();
  return tile;
}
viewer.watch = watch;
viewer.api = api;

async function refreshCameras() {
  const state = document.getElementById("cameras-state");
  let cameras;
  try {
    cameras = await api("/api/cameras");
  } catch (err) {
    state.textContent = `Cannot list cameras: ${err.message}`;
    return;
  }
  state.textContent = cameras.length ? "" : "This viewer is not authorized on any camera.";
  const list = document.getElementById("cameras");
  list.replaceChildren();
  for (const cam of cameras) {
    viewer.cameras.set(cam.name, cam);
    const li = document.createElement("li");
    li.dataset.camera = cam.name;
    const name = document.createElement("b");
    name.textContent = cam.name;
    // A site of several Archivers: the one that records the camera now (textContent: never
    // markup, whatever the directory holds).
    const holder = document.createElement("span");
    holder.className = "archiver";
    holder.textContent = cam.archiver ? ` on ${cam.archiver}` : "";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Watch";
    button.style.float = "right";
    button.onclick = () => watch(cam.name);
    const range = document.createElement("span");
    range.className = "range";
    range.textContent = cam.first_ms != null
      ? `${fmt(cam.first_ms)} – ${fmt(cam.last_ms)} (${cam.segments} segments)` : "nothing recorded";
    const health = document.createElement("span");
    // "behind" still records (late): the Archiver is overloaded, the camera is not down.
    const recording = cam.state === "receiving" || cam.state === "behind";
    health.className = `health ${recording ? "recording" : ""}`;
    health.textContent = cam.health;
    li.append(button, name, holder, range, health);
    list.appendChild(li);
  }
  viewer.camerasLoaded = true;
  for (const tile of viewer.tiles.values()) tile.draw();
}

function shut(title, text) {
  // No session: the page says why and what to do, and shows nothing else.
  document.getElementById("layout").hidden = true;
  document.getElementById("who").textContent = "not connected";
  const gate = document.getElementById("gate");
  gate.querySelector("h1").textContent = title;
  gate.querySelector("p").textContent = text;
  gate.hidden = false;
  viewer.shut = title;
}

async function start() {
  if (!session.launch) {
    shut("Open the viewer with its link",
         "This page needs the link printed by 'fusion-client view' in your terminal. " +
         "Each link opens the viewer once; press Enter there for a new one.");
    return;
  }
  try {
    await session.open();
  } catch (err) {
    shut("This viewer link was used already", err.message);
    return;
  }
  document.getElementById("watch-all").onclick = () => {
    for (const name of viewer.cameras.keys()) watch(name);
  };
  try {
    viewer.info = await api("/api/info");
    document.getElementById("who").textContent =
      `Archiver ${viewer.info.archiver} (pinned sha256 ${viewer.info.archiver_fingerprint.slice(0, 16)}…)` +
      ` · viewer ${viewer.info.viewer_fingerprint.slice(0, 16)}…`;
  } catch (err) {
    document.getElementById("who").textContent = `not connected: ${err.message}`;
  }
  await refreshCameras();
  setInterval(refreshCameras, 5000);
}
start();
