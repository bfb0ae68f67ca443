//! Checks of the embedded eBPF object itself: parsed, never loaded (no root).

use aya_obj::Object;
use portmap_common::prog_names::{TC_EGRESS, TC_FROM_BACKEND, TC_INGRESS, XDP_INGRESS};

use super::EBPF_OBJECT;

/// `BPF_JMP | BPF_CALL`, and its `src_reg` for a call of a function of the same object
/// (`BPF_PSEUDO_CALL`; a helper call has 0).
const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_CALL: u8 = 1;

/// The per-packet programs call no function of their own: every copy and zeroing is expanded
/// inline. LLVM turns a zero literal, or a copy between two places it cannot tell apart, into a
/// call of `memset` or `memmove`, which the BPF backend does not expand: a byte loop in a
/// subprogram per call (`perf` put two MAC copies at ~13 ns of an established TC packet), and a
/// call frame on 6.1's verifier. `maps::zero` and `forward::copy_mac` avoid them; this finds the
/// next one.
#[test]
fn packet_programs_call_no_function_of_the_object() {
    let object = Object::parse(EBPF_OBJECT).expect("the embedded object parses");
    for name in [XDP_INGRESS, TC_INGRESS, TC_EGRESS, TC_FROM_BACKEND] {
        let program = object
            .programs
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let function = &object.functions[&program.function_key()];
        let calls = function
            .instructions
            .iter()
            .filter(|insn| insn.code == BPF_CALL && insn.src_reg() == BPF_PSEUDO_CALL)
            .count();
        assert_eq!(
            calls, 0,
            "{name} makes {calls} call(s) of a function of the object (llvm-objdump -dr shows which: \
             memset or memmove from a zeroed literal or a copy between places that may overlap)"
        );
    }
}
