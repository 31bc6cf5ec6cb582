//! x86_64 machine setup: the address layout (the fixed addresses, and one VM's layout computed
//! from them), kernel files and boot protocol, vCPU registers, CPUID and the MP table.

pub mod boot;
pub mod cpuid;
pub mod kernel_file;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vcpu_state;
pub mod vm_layout;
pub mod vm_state;
