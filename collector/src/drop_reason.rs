//! The names of the kernel's drop reasons (`enum skb_drop_reason`), read from its own BTF at
//! start-up: the list grows and is renumbered between kernel versions, so no table of ours
//! could be right for every kernel.

use std::{collections::HashMap, sync::Arc};

use synspan_shared::MAX_ANSWERED_REASONS;

use crate::btf::Btf;

/// What every constant of the enum starts with; the rest is the name users know.
const PREFIX: &str = "SKB_DROP_REASON_";

/// Reasons that are the kernel's ordinary answer to a handshake packet rather than its
/// loss: a SYN to a port nobody listens on is freed with NO_SOCKET once the RST that
/// refuses it is sent, and the attempt shows that refusal already.
const ANSWERED: [&str; MAX_ANSWERED_REASONS] = ["NO_SOCKET", "TCP_RESET"];

#[derive(Clone, Debug, Default)]
pub(crate) struct DropReasons {
    names: HashMap<u32, Arc<str>>,
}

impl DropReasons {
    /// This kernel's reasons; empty (every reason shown by number) if its BTF lacks them.
    pub(crate) fn from_btf(btf: &Btf) -> Self {
        let Some(values) = btf.enum_values("skb_drop_reason") else {
            tracing::warn!("no enum skb_drop_reason in the kernel's BTF: drop reasons show as numbers");
            return Self::default();
        };
        let names = values
            .into_iter()
            .filter_map(|(name, value)| {
                Some((u32::try_from(value).ok()?, Arc::from(name.strip_prefix(PREFIX)?)))
            })
            .collect();
        Self { names }
    }

    /// `NETFILTER_DROP`, or `reason 12` for a number this kernel's BTF does not name.
    pub(crate) fn name(&self, reason: u32) -> Arc<str> {
        self.names
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("reason {reason}").into())
    }

    /// The numbers of [`ANSWERED`] on this kernel, for the drop program to pass over.
    pub(crate) fn answered(&self) -> [u32; MAX_ANSWERED_REASONS] {
        ANSWERED.map(|answered| {
            self.names
                .iter()
                .find(|(_, name)| ***name == *answered)
                .map_or(0, |(&value, _)| value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::KernelBtf;

    #[test]
    fn names_come_from_this_kernel() {
        let Ok(vmlinux) = KernelBtf::from_sys_fs() else {
            eprintln!("skipped: this kernel has no BTF");
            return;
        };
        let reasons = DropReasons::from_btf(&vmlinux.types().unwrap());
        let netfilter = reasons
            .names
            .iter()
            .find(|(_, name)| &***name == "NETFILTER_DROP")
            .map(|(&value, _)| value)
            .expect("NETFILTER_DROP");
        assert_eq!(&*reasons.name(netfilter), "NETFILTER_DROP");
        assert_eq!(&*reasons.name(u32::MAX), "reason 4294967295");
        assert!(reasons.answered().iter().all(|&n| n != 0));
    }
}
