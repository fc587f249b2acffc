// effrun nn-JIT.web harness. Python (effrun.techniques.nnjit) drives it over the DevTools
// protocol: it places matrices in a WebAssembly.Memory, instantiates the kernels it generated,
// times them with performance.now() loops, runs onnxruntime-web's wasm backend on the same
// problem, and runs a WebGPU (SwiftShader) matmul for correctness. Results go back as blobs.
"use strict";
(function () {
  const problems = new Map();   // pid -> {batch, M, K, N, pa, pb, pc, mem}
  const kernels = new Map();    // kid -> {pid, mm}
  const sessions = new Map();   // sid -> {session, pid, feeds, outName}

  function b64bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  async function fetchBytes(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error("fetch " + url + ": " + r.status);
    return new Uint8Array(await r.arrayBuffer());
  }
  async function postBlob(name, bytes) {
    const r = await fetch("/blob/" + name, {method: "POST", body: bytes});
    if (!r.ok) throw new Error("post " + name + ": " + r.status);
  }
  function median(xs) {
    const s = [...xs].sort((a, b) => a - b);
    return s.length ? s[(s.length - 1) >> 1] : NaN;
  }
  // smallest module that uses v128: validates only where Wasm SIMD is on
  const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0,
    10, 8, 1, 6, 0, 65, 0, 253, 17, 11]);   // (func (result v128) (i32x4.splat (i32.const 0)))

  const NNJIT = {
    ready: false,
    info() {
      return {
        userAgent: navigator.userAgent,
        wasmSimd: WebAssembly.validate(SIMD_PROBE),
        crossOriginIsolated: self.crossOriginIsolated === true,
        hardwareConcurrency: navigator.hardwareConcurrency,
        webgpu: !!navigator.gpu,
      };
    },

    // ---- problems and kernels
    async setProblem(pid, p) {
      const mem = new WebAssembly.Memory({initial: p.pages, maximum: p.pages});
      const f32 = new Float32Array(mem.buffer);
      f32.set(new Float32Array((await fetchBytes(p.aUrl)).buffer), p.pa / 4);
      f32.set(new Float32Array((await fetchBytes(p.bUrl)).buffer), p.pb / 4);
      problems.set(pid, Object.assign({}, p, {mem}));
      return true;
    },
    dropProblem(pid) {
      for (const [k, v] of kernels) if (v.pid === pid) kernels.delete(k);
      for (const [k, v] of sessions) if (v.pid === pid) { v.session.release && v.session.release(); sessions.delete(k); }
      problems.delete(pid);
      return true;
    },
    async compile(kid, pid, b64) {
      const p = problems.get(pid);
      const bytes = b64bytes(b64);
      const t0 = performance.now();
      const module = await WebAssembly.compile(bytes);
      const inst = await WebAssembly.instantiate(module, {env: {mem: p.mem}});
      const ms = performance.now() - t0;
      kernels.set(kid, {pid, mm: inst.exports.mm});
      return {compile_ms: ms};
    },
    dropKernel(kid) { kernels.delete(kid); return true; },
    poisonC(pid) {
      const p = problems.get(pid);
      new Float32Array(p.mem.buffer, p.pc, p.batch * p.M * p.N).fill(NaN);
      return true;
    },
    // One warm-up call (V8 starts a fresh module in its baseline tier and tiers the kernel up in
    // the background, so this call is not judged), then two deciding calls: if the faster of them
    // is slower than abortMs (> 0) there are no repeats (aborted); else up to `repeats` timed
    // samples, stopping early at the deadline (ms from now).
    time(kid, repeats, deadlineMs, abortMs) {
      const k = kernels.get(kid), p = problems.get(k.pid);
      const end = performance.now() + deadlineMs;
      const call = () => { const t = performance.now(); k.mm(p.pa, p.pb, p.pc, p.ps); return performance.now() - t; };
      const warm = call();
      const one = Math.min(call(), call());
      const times = [];
      // calls per sample so that one sample lasts >= 0.5 ms (the timer ticks in 5 us steps)
      const inner = Math.min(10000, Math.max(1, Math.ceil(0.5 / Math.max(one, 0.001))));
      if (!(abortMs > 0 && one > abortMs)) {
        for (let r = 0; r < repeats && performance.now() + one * inner < end; r++) {
          const t0 = performance.now();
          for (let i = 0; i < inner; i++) k.mm(p.pa, p.pb, p.pc, p.ps);
          times.push((performance.now() - t0) / inner);
        }
      }
      // the deciding calls count towards the minimum when one call is long enough for the timer
      const all = inner === 1 ? times.concat([one]) : times;
      return {warm_ms: warm, first_ms: one, times, inner,
              median_ms: times.length ? median(times) : one,
              min_ms: times.length ? Math.min(...all) : one, aborted: times.length === 0};
    },
    run(kid) {
      const k = kernels.get(kid), p = problems.get(k.pid);
      const t0 = performance.now();
      k.mm(p.pa, p.pb, p.pc, p.ps);
      return performance.now() - t0;
    },
    async readC(pid, name) {
      const p = problems.get(pid);
      await postBlob(name, new Uint8Array(p.mem.buffer, p.pc, p.batch * p.M * p.N * 4).slice());
      return true;
    },

    // ---- onnxruntime-web (wasm backend)
    async ortLoad(threads) {
      if (!self.ort) {
        await new Promise((ok, bad) => {
          const s = document.createElement("script");
          s.src = "/ort/ort.wasm.min.js";
          s.onload = ok; s.onerror = () => bad(new Error("cannot load /ort/ort.wasm.min.js"));
          document.head.appendChild(s);
        });
      }
      ort.env.wasm.numThreads = threads;
      ort.env.wasm.wasmPaths = "/ort/";
      ort.env.wasm.proxy = false;
      return {version: ort.env.versions ? ort.env.versions.web || ort.env.versions.common : null};
    },
    async ortSession(sid, pid, modelUrl, bIsInput) {
      const p = problems.get(pid);
      const t0 = performance.now();
      const session = await ort.InferenceSession.create(await fetchBytes(modelUrl),
        {executionProviders: ["wasm"], graphOptimizationLevel: "all"});
      const ms = performance.now() - t0;
      const f32 = new Float32Array(p.mem.buffer);
      const dims = p.batch > 1 || p.bmm ? [p.batch, p.M, p.K] : [p.M, p.K];
      const feeds = {A: new ort.Tensor("float32", f32.slice(p.pa / 4, p.pa / 4 + p.batch * p.M * p.K), dims)};
      if (bIsInput) {
        const bd = p.batch > 1 || p.bmm ? [p.batch, p.K, p.N] : [p.K, p.N];
        feeds.B = new ort.Tensor("float32", f32.slice(p.pb / 4, p.pb / 4 + p.batch * p.K * p.N), bd);
      }
      sessions.set(sid, {session, pid, feeds});
      return {create_ms: ms, inputs: session.inputNames, outputs: session.outputNames};
    },
    async ortTime(sid, repeats, deadlineMs, outName) {
      const s = sessions.get(sid);
      const end = performance.now() + deadlineMs;
      let t0 = performance.now();
      let out = await s.session.run(s.feeds);
      const warm = performance.now() - t0;
      if (outName) await postBlob(outName, new Uint8Array(out.C.data.buffer, out.C.data.byteOffset, out.C.data.byteLength).slice());
      const times = [];
      for (let r = 0; r < repeats && performance.now() + warm < end; r++) {
        t0 = performance.now();
        out = await s.session.run(s.feeds);
        times.push(performance.now() - t0);
      }
      return {warm_ms: warm, times, median_ms: times.length ? median(times) : warm,
              min_ms: times.length ? Math.min(...times) : warm};
    },

    // ---- WebGPU (SwiftShader here): correctness only
    async gpuInfo() {
      if (!navigator.gpu) return {available: false};
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) return {available: false};
      const info = adapter.info || (adapter.requestAdapterInfo ? await adapter.requestAdapterInfo() : {});
      return {available: true, vendor: info.vendor, architecture: info.architecture,
              description: info.description, device: info.device,
              maxWorkgroupStorage: adapter.limits.maxComputeWorkgroupStorageSize,
              maxInvocations: adapter.limits.maxComputeInvocationsPerWorkgroup};
    },
    gpuWgsl(p, c) {
      const T = c.t, KB = c.kb, WM = c.wg_m, WN = c.wg_n;
      const lines = [];
      const w = (s) => lines.push(s);
      w("@group(0) @binding(0) var<storage, read> A: array<f32>;");
      w("@group(0) @binding(1) var<storage, read> B: array<f32>;");
      w("@group(0) @binding(2) var<storage, read_write> C: array<f32>;");
      w(`const M = ${p.M}u; const K = ${p.K}u; const N = ${p.N}u;`);
      w(`const T = ${T}u; const KB = ${KB}u; const WM = ${WM}u; const WN = ${WN}u;`);
      w(`var<workgroup> As: array<f32, ${WM * T * KB}>;`);
      w(`var<workgroup> Bs: array<f32, ${KB * WN * T}>;`);
      w(`@compute @workgroup_size(${WN}, ${WM}, 1)`);
      w("fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {");
      w("  let b = wg.z; let row0 = wg.y * WM * T; let col0 = wg.x * WN * T;");
      w("  let tid = lid.y * WN + lid.x; let nt = WM * WN;");
      w(`  var acc: array<f32, ${T * T}>;`);
      w(`  for (var i = 0u; i < ${T * T}u; i++) { acc[i] = 0.0; }`);
      w("  for (var k0 = 0u; k0 < K; k0 += KB) {");
      w("    for (var i = tid; i < WM * T * KB; i += nt) {");
      w("      let r = row0 + i / KB; let c = k0 + i % KB;");
      w("      var v = 0.0; if (r < M && c < K) { v = A[b * M * K + r * K + c]; } As[i] = v; }");
      w("    for (var i = tid; i < KB * WN * T; i += nt) {");
      w("      let r = k0 + i / (WN * T); let c = col0 + i % (WN * T);");
      w("      var v = 0.0; if (r < K && c < N) { v = B[b * K * N + r * N + c]; } Bs[i] = v; }");
      w("    workgroupBarrier();");
      w("    for (var kk = 0u; kk < KB; kk++) {");
      w("      for (var i = 0u; i < T; i++) {");
      w("        let a = As[(lid.y * T + i) * KB + kk];");
      w("        for (var j = 0u; j < T; j++) { acc[i * T + j] += a * Bs[kk * WN * T + lid.x * T + j]; }");
      w("      }");
      w("    }");
      w("    workgroupBarrier();");
      w("  }");
      w("  for (var i = 0u; i < T; i++) { for (var j = 0u; j < T; j++) {");
      w("    let r = row0 + lid.y * T + i; let c = col0 + lid.x * T + j;");
      w("    if (r < M && c < N) { C[b * M * N + r * N + c] = acc[i * T + j]; } } }");
      w("}");
      return lines.join("\n");
    },
    async gpuMatmul(pid, cfg, outName) {
      const p = problems.get(pid);
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) throw new Error("no WebGPU adapter");
      const device = await adapter.requestDevice();
      const f32 = new Float32Array(p.mem.buffer);
      const nA = p.batch * p.M * p.K, nB = p.batch * p.K * p.N, nC = p.batch * p.M * p.N;
      const mk = (n, usage) => device.createBuffer({size: Math.max(16, n * 4), usage});
      const S = GPUBufferUsage.STORAGE, D = GPUBufferUsage.COPY_DST, R = GPUBufferUsage.COPY_SRC;
      const bA = mk(nA, S | D), bB = mk(nB, S | D), bC = mk(nC, S | R);
      const rb = mk(nC, GPUBufferUsage.MAP_READ | D);
      device.queue.writeBuffer(bA, 0, f32.subarray(p.pa / 4, p.pa / 4 + nA));
      device.queue.writeBuffer(bB, 0, f32.subarray(p.pb / 4, p.pb / 4 + nB));
      const code = NNJIT.gpuWgsl(p, cfg);
      const module = device.createShaderModule({code});
      const pipeline = await device.createComputePipelineAsync({layout: "auto", compute: {module, entryPoint: "main"}});
      const bind = device.createBindGroup({layout: pipeline.getBindGroupLayout(0), entries: [
        {binding: 0, resource: {buffer: bA}}, {binding: 1, resource: {buffer: bB}}, {binding: 2, resource: {buffer: bC}}]});
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, bind);
      pass.dispatchWorkgroups(Math.ceil(p.N / (cfg.wg_n * cfg.t)), Math.ceil(p.M / (cfg.wg_m * cfg.t)), p.batch);
      pass.end();
      enc.copyBufferToBuffer(bC, 0, rb, 0, nC * 4);
      const t0 = performance.now();
      device.queue.submit([enc.finish()]);
      await rb.mapAsync(GPUMapMode.READ);
      const ms = performance.now() - t0;
      await postBlob(outName, new Uint8Array(rb.getMappedRange(0, nC * 4)).slice());
      rb.unmap();
      device.destroy();
      return {ms};
    },
  };
  window.NNJIT = NNJIT;
  NNJIT.ready = true;
})();
