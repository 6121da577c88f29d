//! opa-ingress-hosts: a Gatekeeper-mode policy that speaks the OPA Wasm ABI
//! (1.0: the eval-context exports) without Rego, for want of an offline Rego
//! compiler. It decides what deploy/examples/rego/ingress-host-in-use.rego
//! decides: entrypoint `ingress/hosts/violation` yields one
//! `{"msg": "ingress host conflicts with an existing ingress <HOST>"}` per
//! host of the reviewed Ingress that another Ingress in
//! `data.inventory.namespace[ns]["networking.k8s.io/v1"].Ingress[name]` has.
//!
//! Like OPA's own modules, values live on a heap whose pointer the host reads
//! and resets (`opa_heap_ptr_get` / `opa_heap_ptr_set`): the allocator is a
//! bump allocator over the imported memory and frees nothing.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeSet;

use serde_json::{json, Value};

const PAGE: usize = 65536;

extern "C" {
    static __heap_base: u8;
}

static mut HEAP: usize = 0;

fn heap() -> usize {
    unsafe {
        if HEAP == 0 {
            HEAP = &__heap_base as *const u8 as usize;
        }
        HEAP
    }
}

struct Bump;

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let start = (heap() + layout.align() - 1) & !(layout.align() - 1);
        let end = start + layout.size();
        let have = core::arch::wasm32::memory_size::<0>() * PAGE;
        if end > have && core::arch::wasm32::memory_grow::<0>((end - have + PAGE - 1) / PAGE) == usize::MAX {
            return core::ptr::null_mut();
        }
        HEAP = end;
        start as *mut u8
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump;

static mut INPUT: usize = 0;
static mut DATA: usize = 0;
static mut RESULT: usize = 0;

fn boxed(value: Value) -> usize {
    Box::into_raw(Box::new(value)) as usize
}

unsafe fn value<'a>(addr: usize) -> &'a Value {
    &*(addr as *const Value)
}

#[no_mangle]
pub extern "C" fn opa_malloc(size: usize) -> usize {
    unsafe { ALLOCATOR.alloc(Layout::from_size_align_unchecked(size.max(1), 1)) as usize }
}

#[no_mangle]
pub extern "C" fn opa_json_parse(addr: usize, len: usize) -> usize {
    let text = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    match serde_json::from_slice::<Value>(text) {
        Ok(parsed) => boxed(parsed),
        Err(_) => 0,
    }
}

#[no_mangle]
pub extern "C" fn opa_json_dump(addr: usize) -> usize {
    let mut text = serde_json::to_vec(unsafe { value(addr) }).unwrap_or_default();
    text.push(0);
    text.leak().as_ptr() as usize
}

#[no_mangle]
pub extern "C" fn opa_heap_ptr_get() -> usize {
    heap()
}

#[no_mangle]
pub extern "C" fn opa_heap_ptr_set(addr: usize) {
    unsafe { HEAP = addr }
}

#[no_mangle]
pub extern "C" fn builtins() -> usize {
    boxed(json!({}))
}

#[no_mangle]
pub extern "C" fn entrypoints() -> usize {
    boxed(json!({"ingress/hosts/violation": 0}))
}

#[no_mangle]
pub extern "C" fn opa_eval_ctx_new() -> usize {
    1
}

#[no_mangle]
pub extern "C" fn opa_eval_ctx_set_input(_ctx: usize, addr: usize) {
    unsafe { INPUT = addr }
}

#[no_mangle]
pub extern "C" fn opa_eval_ctx_set_data(_ctx: usize, addr: usize) {
    unsafe { DATA = addr }
}

#[no_mangle]
pub extern "C" fn opa_eval_ctx_set_entrypoint(_ctx: usize, _entrypoint: usize) {}

#[no_mangle]
pub extern "C" fn opa_eval_ctx_get_result(_ctx: usize) -> usize {
    unsafe { RESULT }
}

#[no_mangle]
pub extern "C" fn eval(_ctx: usize) -> usize {
    let (input, data) = unsafe { (value(INPUT), value(DATA)) };
    let violations: Vec<Value> = violations(input, data)
        .into_iter()
        .map(|host| json!({"msg": format!("ingress host conflicts with an existing ingress <{}>", host)}))
        .collect();
    unsafe { RESULT = boxed(json!([{"result": violations}])) };
    0
}

fn hosts(ingress: &Value) -> BTreeSet<&str> {
    ingress
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .map(|rules| rules.iter().filter_map(|rule| rule.get("host").and_then(Value::as_str)).collect())
        .unwrap_or_default()
}

/// The reviewed Ingress's hosts that another Ingress of the inventory has, sorted.
fn violations<'a>(input: &'a Value, data: &'a Value) -> BTreeSet<&'a str> {
    let review = &input["review"];
    let requested = hosts(&review["object"]);
    let reviewed = (review["namespace"].as_str().unwrap_or(""), review["name"].as_str().unwrap_or(""));
    let mut conflicts = BTreeSet::new();
    let namespaces = data.pointer("/inventory/namespace").and_then(Value::as_object);
    for (namespace, versions) in namespaces.into_iter().flatten() {
        let ingresses = versions.pointer("/networking.k8s.io~1v1/Ingress").and_then(Value::as_object);
        for (name, other) in ingresses.into_iter().flatten() {
            if (namespace.as_str(), name.as_str()) != reviewed {
                conflicts.extend(hosts(other).intersection(&requested));
            }
        }
    }
    conflicts
}
