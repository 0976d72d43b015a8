//! Go-style command lines: flanneld's unit files write `-etcd-endpoints=…`, `-iface eth0`,
//! `-ip-masq`, as Go's flag package reads them; [`go_style_argv`] rewrites them into the
//! `--flag=value` clap takes, knowing from [`flag_table`] which flags take a value.

use std::ffi::OsString;

/// How a long flag takes its value, for reading Go-style command lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagKind {
    /// Needs a value: `-name=value` or `-name value`.
    Value,
    /// Takes no value or an optional one given only with `=` (`-ip-masq`, `-ip-masq=false`,
    /// `--help`): the next argument is never its value.
    Bool,
}

/// The long flags `cmd` accepts at its top level and how each takes its value.
pub fn flag_table(cmd: &clap::Command) -> Vec<(String, FlagKind)> {
    let mut cmd = cmd.clone();
    cmd.build();
    cmd.get_arguments()
        .filter_map(|a| {
            let takes_value =
                a.get_action().takes_values() && a.get_num_args().is_none_or(|n| n.min_values() > 0);
            let kind = if takes_value {
                FlagKind::Value
            } else {
                FlagKind::Bool
            };
            Some((a.get_long()?.to_string(), kind))
        })
        .collect()
}

/// Rewrites a command line written for flanneld (Go's `flag` package) into the form clap reads.
///
/// Go accepts `-name`, `--name`, `-name=value`, `--name=value` and, for flags that need a value,
/// `-name value`; a boolean flag never takes the next argument (`-ip-masq`, `-ip-masq=false`).
/// Flag parsing stops at `--` or at the first argument that is not a flag (a subcommand here).
/// Every flag before that becomes `--name` or `--name=value` (the value of a [`FlagKind::Value`]
/// flag is taken whole, even when it starts with `-`). Unknown names are rewritten the same way so
/// that clap's error names them as `--name`; single-letter short options clap knows only as
/// shorts (`-h`, `-V`) and anything that is not UTF-8 are left as they are.
pub fn go_style_argv<I, T>(argv: I, flags: &[(String, FlagKind)]) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut it = argv.into_iter().map(Into::into);
    let mut out: Vec<OsString> = it.next().into_iter().collect();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        let body = match text.strip_prefix("--").or_else(|| text.strip_prefix('-')) {
            // `--`, a lone `-`, a subcommand or a positional: Go stops reading flags here.
            Some(b) if !b.is_empty() && text != "--" => b,
            _ => {
                out.push(arg);
                out.extend(it);
                break;
            }
        };
        if body.starts_with('-') {
            out.push(arg); // `---x`: bad syntax; clap says so.
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let kind = flags.iter().find(|(n, _)| n == name).map(|(_, k)| *k);
        if kind.is_none() && name.chars().count() == 1 && !text.starts_with("--") {
            out.push(arg); // a short option (`-h`, `-V`)
            continue;
        }
        match (kind, value) {
            (Some(FlagKind::Value), None) => match it.next() {
                Some(v) => {
                    let mut joined = OsString::from(format!("--{name}="));
                    joined.push(v);
                    out.push(joined);
                }
                None => out.push(format!("--{name}").into()),
            },
            (_, Some(v)) => out.push(format!("--{name}={v}").into()),
            (_, None) => out.push(format!("--{name}").into()),
        }
    }
    out
}
