//! The eBPF programs call no byte-wise `mem*` function. In BPF, LLVM
//! turns an `==` on an array of more than two words into a call to
//! `memcmp`/`bcmp`, and a struct store or copy of unknown alignment into
//! `memcpy`/`memmove`: subprograms that loop over bytes (a 40-byte IPv6
//! flow key compare made the IPv6 conntrack hit twice as slow). Nothing
//! else would notice: the programs stay correct, only slower.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

/// The byte-wise functions LLVM emits calls to in BPF.
const BYTE_WISE: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

/// `(section, called function)` for each call in a code section of `elf`
/// (the program's `xdp` stub and `.text`, where its body and the `mem*`
/// functions live) to one of [`BYTE_WISE`].
fn byte_wise_calls(elf: &[u8]) -> Vec<(String, String)> {
    let file = object::File::parse(elf).expect("an ELF object");
    let mut calls = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or_default().to_string();
        if section.kind() != SectionKind::Text {
            continue;
        }
        for (_, reloc) in section.relocations() {
            let RelocationTarget::Symbol(index) = reloc.target() else {
                continue;
            };
            let Ok(symbol) = file.symbol_by_index(index) else {
                continue;
            };
            let target = symbol.name().unwrap_or_default();
            if BYTE_WISE.contains(&target) {
                calls.push((name.clone(), target.to_string()));
            }
        }
    }
    calls
}

#[test]
fn the_balancer_calls_no_byte_wise_mem_function() {
    assert!(
        byte_wise_calls(crate::datapath::OBJECT).is_empty(),
        "{:?}",
        byte_wise_calls(crate::datapath::OBJECT)
    );
}

#[test]
fn the_decap_program_calls_no_byte_wise_mem_function() {
    assert!(
        byte_wise_calls(crate::decap::OBJECT).is_empty(),
        "{:?}",
        byte_wise_calls(crate::decap::OBJECT)
    );
}
