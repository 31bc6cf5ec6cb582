//! x86_64 machine setup: the address layout, boot protocol, vCPU registers, CPUID and the MP
//! table.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
