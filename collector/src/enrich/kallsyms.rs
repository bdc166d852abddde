//! Names for kernel addresses: the symbols of `/proc/kallsyms`, read once, in one table.
//!
//! Our own reader rather than aya's `kernel_symbols()`: that returns a `BTreeMap<u64, String>`,
//! one allocation per symbol, and on this machine's kernel (122,133 symbols) it held 7.1 MiB
//! of the agent's heap for its whole life (heaptrack, churn soak), a tenth of the agent's
//! 64 MiB. Here every name lives in one string and every symbol in 16 bytes: 4.6 MiB.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::PathBuf,
};

use super::symbols::{SymbolError, lookup_address};

/// No kernel function is this long. An address further from the symbol below it is in code
/// that `/proc/kallsyms` did not list when it was read: a module loaded since, a BPF program.
const MAX_KERNEL_SYMBOL_SPAN: u64 = 1 << 20;

/// Longer lines are not symbols the kernel writes (`KSYM_NAME_LEN` is 512, a module name 56):
/// skipped, so a line never costs more than this.
const MAX_LINE: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u64,
    /// Where its name starts in [`KernelSymbols::names`].
    name: u32,
    name_len: u16,
    /// 0 for the kernel image, else one more than its index in [`KernelSymbols::modules`].
    module: u16,
}

/// The kernel's symbols, sorted by address.
pub(crate) struct KernelSymbols {
    symbols: Vec<Symbol>,
    names: String,
    modules: Vec<Box<str>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelSymbol<'a> {
    pub(crate) name: &'a str,
    /// The module, for a symbol that is not in the kernel image.
    pub(crate) module: Option<&'a str>,
    pub(crate) offset: u64,
}

impl fmt::Display for KernelSymbol<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)?;
        if let Some(module) = self.module {
            write!(f, " [{module}]")?;
        }
        Ok(())
    }
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms`. The kernel shows the addresses only to a reader with
    /// `CAP_SYSLOG` (or to everyone, with `kernel.kptr_restrict=0`), and synspan does not keep
    /// that capability: load them before dropping capabilities.
    pub(crate) fn load() -> Result<Self, SymbolError> {
        let path = "/proc/kallsyms";
        let io = |source| SymbolError::Io {
            path: PathBuf::from(path),
            source,
        };
        Self::read(BufReader::new(File::open(path).map_err(io)?)).map_err(|err| match err {
            ReadError::Io(source) => io(source),
            ReadError::Hidden => SymbolError::KernelAddressesHidden,
        })
    }

    /// `/proc/kallsyms` lines: `ffffffff81000000 T _stext`, `ffffffffc0a01000 t nft_do_chain\t[nf_tables]`.
    /// Lines that are not such are skipped; symbols past what the table can index are left out.
    fn read(mut kallsyms: impl BufRead) -> Result<Self, ReadError> {
        let mut table = Self {
            symbols: Vec::new(),
            names: String::new(),
            modules: Vec::new(),
        };
        let mut line = Vec::new();
        loop {
            line.clear();
            if Read::take(&mut kallsyms, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(ReadError::Io)?
                == 0
            {
                break;
            }
            if line.len() > MAX_LINE {
                if line.last() != Some(&b'\n') {
                    // The rest of an overlong line.
                    kallsyms.skip_until(b'\n').map_err(ReadError::Io)?;
                }
                continue;
            }
            if let Ok(text) = std::str::from_utf8(&line) {
                table.push(text.trim_end_matches('\n'));
            }
        }
        if !table.symbols.iter().any(|s| s.start != 0) {
            return Err(ReadError::Hidden);
        }
        table.symbols.sort_by_key(|s| s.start);
        table.symbols.shrink_to_fit();
        table.names.shrink_to_fit();
        Ok(table)
    }

    fn push(&mut self, line: &str) {
        let mut fields = line.splitn(3, ' ');
        let (Some(start), Some(_kind), Some(rest)) = (fields.next(), fields.next(), fields.next()) else {
            return;
        };
        let Ok(start) = u64::from_str_radix(start, 16) else {
            return;
        };
        let (name, module) = match rest.split_once('\t') {
            Some((name, module)) => (name, Some(module.trim_start_matches('[').trim_end_matches(']'))),
            None => (rest, None),
        };
        let (Ok(name_len), Ok(name_at)) = (u16::try_from(name.len()), u32::try_from(self.names.len())) else {
            return;
        };
        if name.is_empty() || u32::try_from(self.names.len() + name.len()).is_err() {
            return;
        }
        let module = match module {
            None => 0,
            // Lines come grouped by module: the last one named is almost always this one.
            Some(m) => match self.modules.iter().rposition(|known| &**known == m) {
                Some(i) => i + 1,
                None => {
                    self.modules.push(m.into());
                    self.modules.len()
                }
            },
        };
        let Ok(module) = u16::try_from(module) else {
            return;
        };
        self.names.push_str(name);
        self.symbols.push(Symbol {
            start,
            name: name_at,
            name_len,
            module,
        });
    }

    fn name(&self, symbol: &Symbol) -> &str {
        let at = symbol.name as usize;
        &self.names[at..at + usize::from(symbol.name_len)]
    }

    /// The symbol an address is in: the nearest one at or below it.
    pub(crate) fn resolve(&self, addr: u64) -> Option<KernelSymbol<'_>> {
        let below = self.symbols.partition_point(|s| s.start <= addr).checked_sub(1)?;
        let symbol = &self.symbols[below];
        let offset = addr - symbol.start;
        if offset >= MAX_KERNEL_SYMBOL_SPAN {
            return None;
        }
        let module = symbol
            .module
            .checked_sub(1)
            .map(|i| &*self.modules[usize::from(i)]);
        Some(KernelSymbol {
            name: self.name(symbol),
            module,
            offset,
        })
    }

    /// One line per frame: `tcp_connect+0x5`, `nf_hook_slow+0x44 [nf_tables]`, or the bare
    /// address when no symbol fits.
    pub(crate) fn symbolize(&self, addrs: &[u64]) -> Vec<String> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let lookup = lookup_address(i, addr);
                match self.resolve(lookup) {
                    Some(mut symbol) => {
                        symbol.offset += addr - lookup;
                        symbol.to_string()
                    }
                    None => format!("{addr:#x}"),
                }
            })
            .collect()
    }

    /// Symbols held, and the bytes the table takes.
    pub(crate) fn footprint(&self) -> (usize, usize) {
        let bytes = self.symbols.capacity() * size_of::<Symbol>()
            + self.names.capacity()
            + self
                .modules
                .iter()
                .map(|m| m.len() + size_of::<Box<str>>())
                .sum::<usize>();
        (self.symbols.len(), bytes)
    }
}

enum ReadError {
    Io(io::Error),
    Hidden,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> KernelSymbols {
        KernelSymbols::read(text.as_bytes()).ok().unwrap()
    }

    #[test]
    fn kernel_symbol_plus_offset() {
        let kernel = KernelSymbols::load().unwrap();
        let tcp_connect = kernel
            .symbols
            .iter()
            .find(|s| kernel.name(s) == "tcp_connect" && s.module == 0)
            .expect("tcp_connect in /proc/kallsyms")
            .start;
        assert_eq!(
            kernel.resolve(tcp_connect + 5).unwrap().to_string(),
            "tcp_connect+0x5"
        );
        assert_eq!(
            kernel.symbolize(&[tcp_connect + 5, tcp_connect + 0x20]),
            ["tcp_connect+0x5", "tcp_connect+0x20"]
        );
        let (symbols, bytes) = kernel.footprint();
        assert!(symbols > 10_000, "{symbols} symbols");
        assert!(bytes < symbols * 48, "{bytes} bytes for {symbols} symbols");
    }

    #[test]
    fn kernel_modules_return_addresses_and_strays() {
        // Out of order, as module symbols are, with lines that are not symbols.
        let kernel = table(
            "ffffffffc0000000 t nft_do_chain\t[nf_tables]\n\
             ffffffff81000100 T noreturn_caller\n\
             ffffffff81000000 T _stext\n\
             garbage\n\
             ffffffff81000200 t next_function\n\
             ffffffffc0000100 t nft_lookup\t[nf_tables]\n\
             ffffffffc1000000 t\n",
        );
        let module = kernel.resolve(0xffff_ffff_c000_0044).unwrap();
        assert_eq!(module.module, Some("nf_tables"));
        assert_eq!(module.to_string(), "nft_do_chain+0x44 [nf_tables]");
        assert_eq!(kernel.modules.len(), 1, "one copy of each module's name");
        assert_eq!(
            kernel.symbolize(&[
                // Where the thread was: exactly at the start of a function.
                0xffff_ffff_8100_0200,
                // A return address right after a call that ends the function before.
                0xffff_ffff_8100_0200,
                // Below every symbol, and far above the last one.
                0x1000,
                0xffff_ffff_c100_0000,
            ]),
            [
                "next_function+0x0",
                "noreturn_caller+0x100",
                "0x1000",
                "0xffffffffc1000000"
            ]
        );
    }

    #[test]
    fn hidden_kernel_addresses_are_an_error() {
        // With kernel.kptr_restrict every line reads 0000000000000000.
        let hidden = "0000000000000000 T tcp_connect\n0000000000000000 T tcp_v4_connect\n";
        assert!(matches!(
            KernelSymbols::read(hidden.as_bytes()),
            Err(ReadError::Hidden)
        ));
    }

    #[test]
    fn overlong_lines_are_skipped_whole() {
        let long = format!(
            "ffffffff81000000 T {}\nffffffff81000300 T after\n",
            "x".repeat(5000)
        );
        let kernel = table(&long);
        assert_eq!(kernel.footprint().0, 1);
        assert_eq!(kernel.resolve(0xffff_ffff_8100_0301).unwrap().name, "after");
    }
}
