//! Where a setting of either binary comes from: a flag on the command line, else its
//! environment variable (`COLLAB_` + the flag in upper snake case), else the TOML file named by
//! `--config` (or `COLLAB_CONFIG`), else the built-in default.
//!
//! One rule for both binaries and every flag, flattened structs included: [`command`] gives
//! each flag its environment variable, and [`try_parse_from`] turns the file's settings into
//! the flags' defaults, so clap's own precedence (command line, then environment, then
//! default) does the rest. Runs once at startup; never on the hot path.

use std::ffi::OsString;
use std::path::Path;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

/// Prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "COLLAB_";

/// The id of the flag that names the settings file.
pub const CONFIG_FLAG: &str = "config";

/// Longest settings file read (a mistyped path to a huge file must not be slurped).
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// What `--help` says about the layers, after the flags.
pub const LAYERS_HELP: &str = "\
Every flag can also be set by its environment variable (shown as [env: ...]) or in the TOML \
file given by --config, keyed by the flag's name (--some-flag 30s is some-flag = \"30s\"). A \
flag on the command line wins over its environment variable, which wins over the --config \
file, which wins over the default.

Durations take a unit: 250ms, 1.5s, 30s, 1h. Sizes take a plain number of bytes or a unit: \
64KiB, 16MiB (MB is 1,000,000).

Logging: RUST_LOG sets the level (error, warn, info, debug, trace; by default info for \
collab-engine, error for collab-load), also per module, e.g. \
RUST_LOG=info,collab_engine::acceptor=debug. Logs go to stderr.";

/// The environment variable of the flag `--long`: `idle-timeout` gives `COLLAB_IDLE_TIMEOUT`.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// `T`'s command with an environment variable for every flag that has no explicit one, and
/// the layering rule in its `--help`.
pub fn command<T: CommandFactory>() -> Command {
    let mut cmd = T::command().after_help(LAYERS_HELP);
    let ids: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_none() && !is_builtin(a))
        .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_owned())))
        .collect();
    for (id, long) in ids {
        // The help shows the variable, never its value: it may hold a secret.
        cmd = cmd.mut_arg(id, |a| a.env(env_name(&long)).hide_env_values(true));
    }
    cmd
}

/// Parses `T` from the process's arguments and environment (and the `--config` file); on an
/// error (or `--help`) prints clap's message and exits, as `Parser::parse` does.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// Parses `T` from `args` (the first is the program name) and the process environment, with
/// the settings of the `--config` file (or the file `COLLAB_CONFIG` names) as defaults.
///
/// # Errors
/// clap's error for a bad flag or environment value; an error naming the file and the setting
/// for an unreadable file, bad TOML, an unknown key or a bad value in the file.
pub fn try_parse_from<T, I, A>(args: I) -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = command::<T>();
    if let Some(path) = config_path(&cmd, &args) {
        let text = read_file(&mut cmd, &path)?;
        cmd = apply_file(cmd, &path, &text)?;
    }
    let matches = match cmd.try_get_matches_from_mut(&args) {
        Ok(matches) => matches,
        Err(e) => return Err(name_env_source(&mut cmd, &args, e)),
    };
    T::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// clap names the flag of a bad value even when the value came from its environment variable;
/// say so, or a user looks for a flag they never typed.
fn name_env_source(cmd: &mut Command, args: &[OsString], e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return e;
    }
    let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let Some(long) = flag
        .strip_prefix("--")
        .and_then(|rest| rest.split([' ', '=']).next())
    else {
        return e;
    };
    let Some(env) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|env| env.to_string_lossy().into_owned())
    else {
        return e;
    };
    let typed = args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    match std::env::var(&env) {
        Ok(value) if !typed => {
            let why = e.to_string();
            let why = why
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            cmd.error(e.kind(), format!("{env}={value:?}: {why}"))
        }
        _ => e,
    }
}

/// Help and version: no environment variable, no file key.
fn is_builtin(arg: &Arg) -> bool {
    matches!(arg.get_id().as_str(), "help" | "version")
}

/// The `--config` value of a first, lenient pass (so `--label --config` stays a label), or
/// `None` when the command has no `--config` flag or it was not given.
fn config_path(cmd: &Command, args: &[OsString]) -> Option<OsString> {
    if !cmd.get_arguments().any(|a| a.get_id() == CONFIG_FLAG) {
        return None;
    }
    let probe = cmd
        .clone()
        .ignore_errors(true)
        .disable_help_flag(true)
        .disable_version_flag(true);
    let matches: ArgMatches = probe.try_get_matches_from(args).ok()?;
    matches
        .get_raw(CONFIG_FLAG)
        .and_then(|mut values| values.next())
        .map(ToOwned::to_owned)
}

fn read_file(cmd: &mut Command, path: &OsString) -> Result<String, clap::Error> {
    let shown = Path::new(path).display().to_string();
    let io_err = |cmd: &mut Command, e: std::io::Error| {
        cmd.error(ErrorKind::Io, format!("cannot read --config {shown}: {e}"))
    };
    let file = std::fs::File::open(path).map_err(|e| io_err(cmd, e))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, CONFIG_FILE_BYTES_MAX + 1),
        &mut text,
    )
    .map_err(|e| io_err(cmd, e))?;
    if text.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err(cmd.error(
            ErrorKind::Io,
            format!("--config {shown} is larger than {CONFIG_FILE_BYTES_MAX} bytes"),
        ));
    }
    Ok(text)
}

/// Makes every setting of the TOML `text` the default of its flag.
fn apply_file(mut cmd: Command, path: &OsString, text: &str) -> Result<Command, clap::Error> {
    let shown = Path::new(path).display().to_string();
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(e) => {
            let why = e.to_string();
            return Err(cmd.error(
                ErrorKind::InvalidValue,
                format!("--config {shown} is not valid TOML: {}", why.trim_end()),
            ));
        }
    };
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in &table {
        match setting(&cmd, key, value, &seen) {
            Ok((id, values)) => {
                seen.push(id.clone());
                cmd = cmd.mut_arg(id, |a| a.default_values(values));
            }
            Err((kind, why)) => {
                return Err(cmd.error(kind, format!("--config {shown}: {why}")));
            }
        }
    }
    Ok(cmd)
}

/// The flag id and the checked values of the file's `key = value`.
fn setting(
    cmd: &Command,
    key: &str,
    value: &toml::Value,
    seen: &[String],
) -> Result<(String, Vec<String>), (ErrorKind, String)> {
    let Some(arg) = find_setting(cmd, key) else {
        let example = cmd
            .get_arguments()
            .find(|a| !is_builtin(a) && a.get_id() != CONFIG_FLAG)
            .and_then(Arg::get_long)
            .unwrap_or("listen");
        return Err((
            ErrorKind::UnknownArgument,
            format!(
                "unknown setting `{key}` (keys are the flags' names, e.g. `{example}`; see --help)"
            ),
        ));
    };
    let id = arg.get_id().to_string();
    if seen.contains(&id) {
        return Err((
            ErrorKind::ArgumentConflict,
            format!("setting `{key}` is given twice"),
        ));
    }
    let values = file_values(arg, value)
        .map_err(|why| (ErrorKind::InvalidValue, format!("setting `{key}`: {why}")))?;
    // Check each value now, with the flag's own parser, so the error names the file's key.
    if takes_values(arg) {
        let long = arg.get_long().unwrap_or(key).to_owned();
        let probe = Command::new("probe").no_binary_name(true).arg(
            arg.clone()
                .env(None::<&str>)
                .default_values(Vec::<String>::new())
                .required(false),
        );
        for value in &values {
            if let Err(e) = probe
                .clone()
                .try_get_matches_from([format!("--{long}={value}")])
            {
                let why = e.to_string();
                let why = why
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                return Err((ErrorKind::InvalidValue, format!("setting `{key}`: {why}")));
            }
        }
    }
    Ok((id, values))
}

/// The flag a file key names: its long name (`idle-timeout`) or, as in the environment
/// variables, with underscores (`idle_timeout`).
fn find_setting<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    let long = key.replace('_', "-");
    cmd.get_arguments().find(|a| {
        !is_builtin(a) && a.get_id() != CONFIG_FLAG && a.get_long() == Some(long.as_str())
    })
}

fn takes_values(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

/// The flag values a TOML value stands for.
fn file_values(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    if !takes_values(arg) {
        // A switch such as --no-check: only `true` or `false` make sense.
        return match value {
            toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
            other => Err(format!(
                "expected true or false, found {}",
                other.type_str()
            )),
        };
    }
    let repeatable =
        matches!(arg.get_action(), ArgAction::Append) || arg.get_value_delimiter().is_some();
    match value {
        toml::Value::Array(items) if repeatable => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("takes one value, not an array".to_owned()),
        other => scalar(other).map(|v| vec![v]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}
