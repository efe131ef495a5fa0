//! The tools directory: every `*.wasm` component in it is compiled (once per
//! content digest, cached on disk), pre-linked, and asked to `describe`
//! itself. A component that fails any step is reported and skipped; it never
//! takes the daemon or the other tools down. Rescanning picks up added,
//! replaced and removed files without a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use harness_daemon::error_chain;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Linker;

use super::engine::CompileCache;
use super::invoke::{CallOutcome, HostState, InvocationLimits, run_describe};
use super::{ToolComponentPre, WasiError};

/// A loaded, callable tool.
pub struct LoadedTool {
    /// Tool name from `describe`.
    pub name: String,
    /// Description from `describe`.
    pub description: String,
    /// Input JSON Schema.
    pub input_schema: serde_json::Value,
    /// Output JSON Schema, `Null` if undeclared.
    pub output_schema: serde_json::Value,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    /// The file it came from.
    pub path: PathBuf,
    /// Pre-linked instance factory.
    pub pre: ToolComponentPre<HostState>,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for LoadedTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTool")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One violation of a tool's input schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the input.
    pub instance_path: String,
    /// What is wrong.
    pub message: String,
}

impl LoadedTool {
    /// Checks `input` against the input schema, returning every violation.
    pub fn validate(&self, input: &serde_json::Value) -> Vec<Violation> {
        self.validator
            .iter_errors(input)
            .map(|error| Violation {
                instance_path: error.instance_path().to_string(),
                message: error.to_string(),
            })
            .collect()
    }
}

/// Why a component could not become a tool.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Compilation failed (not a component, truncated, invalid).
    #[error("{path} is not a loadable component")]
    Compile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: WasiError,
    },
    /// It does not implement the `harness:tool/tool-component` world.
    #[error(
        "{path} does not implement the harness:tool world or imports something sandboxd does not provide"
    )]
    Link {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
    /// `describe` failed or returned something unusable.
    #[error("{path}: describe() {problem}")]
    Describe {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// Another component already provides this tool name.
    #[error("{path}: tool name {name:?} is already provided by {other}")]
    DuplicateName {
        /// The file.
        path: PathBuf,
        /// The name.
        name: String,
        /// The file that has it.
        other: PathBuf,
    },
}

/// Identity of a file version, to notice replacements cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSignature {
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Default)]
struct RegistryState {
    by_name: BTreeMap<String, Arc<LoadedTool>>,
    by_path: HashMap<PathBuf, (FileSignature, Result<Arc<LoadedTool>, String>)>,
    defaults: BTreeMap<String, ToolDefaults>,
    manifest_error: Option<String>,
}

/// The optional manifest file in the tools directory.
pub const MANIFEST_FILE: &str = "tools.toml";

/// Per-tool defaults from `<tools-dir>/tools.toml`, e.g.
///
/// ```toml
/// [tool.grep]
/// timeout = "10s"
/// memory-bytes = 134217728
/// max-output-bytes = 65536
/// fuel = 5000000000
/// ```
///
/// They can only tighten a session's limits, never loosen them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ToolDefaults {
    /// Deadline for one call of this tool.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Linear-memory cap.
    pub memory_bytes: Option<u64>,
    /// Cap on kept stdout and on kept stderr.
    pub max_output_bytes: Option<u64>,
    /// Instruction budget.
    pub fuel: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    tool: BTreeMap<String, ToolDefaults>,
}

/// Reads the manifest; a missing file is an empty manifest.
fn read_manifest(dir: &Path) -> Result<BTreeMap<String, ToolDefaults>, String> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    toml::from_str::<Manifest>(&text)
        .map(|m| m.tool)
        .map_err(|e| format!("invalid {}: {e}", path.display()))
}

/// The set of tools loaded from a directory.
pub struct ToolRegistry {
    dir: PathBuf,
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache: CompileCache,
    state: RwLock<RegistryState>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Limits for running `describe` at load time.
const DESCRIBE_LIMITS: InvocationLimits = InvocationLimits {
    timeout: Duration::from_secs(5),
    memory_bytes: 64 << 20,
    max_output_bytes: 64 << 10,
    fuel: None,
};

impl ToolRegistry {
    /// An empty registry over `dir`; call [`ToolRegistry::rescan`] to load.
    pub fn new(
        dir: PathBuf,
        engine: Engine,
        linker: Arc<Linker<HostState>>,
        cache: CompileCache,
    ) -> Self {
        Self {
            dir,
            engine,
            linker,
            cache,
            state: RwLock::new(RegistryState::default()),
        }
    }

    /// Looks a tool up by name.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedTool>> {
        self.read().by_name.get(name).cloned()
    }

    /// All tools, sorted by name.
    pub fn tools(&self) -> Vec<Arc<LoadedTool>> {
        self.read().by_name.values().cloned().collect()
    }

    /// The manifest's defaults for a tool (empty if none).
    pub fn defaults(&self, name: &str) -> ToolDefaults {
        self.read().defaults.get(name).copied().unwrap_or_default()
    }

    /// Components that failed to load: (path, message).
    pub fn load_errors(&self) -> Vec<(PathBuf, String)> {
        let state = self.read();
        let manifest_error = state
            .manifest_error
            .clone()
            .map(|e| (self.dir.join(MANIFEST_FILE), e));
        let mut errors: Vec<_> = manifest_error
            .into_iter()
            .chain(state.by_path.iter().filter_map(|(path, (_, loaded))| {
                loaded.as_ref().err().map(|e| (path.clone(), e.clone()))
            }))
            .collect();
        errors.sort();
        errors
    }

    /// Re-reads the directory: loads new and changed files, drops removed
    /// ones. Unchanged files are not touched.
    pub async fn rescan(&self) {
        let files = match list_components(&self.dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot list the tools directory");
                Vec::new()
            }
        };
        let mut next: HashMap<PathBuf, (FileSignature, Result<Arc<LoadedTool>, String>)> =
            HashMap::new();
        for (path, signature) in files {
            let previous = self.read().by_path.get(&path).cloned();
            let entry = match previous {
                Some((old_sig, loaded)) if old_sig == signature => loaded,
                _ => {
                    let loaded = self
                        .load(&path)
                        .await
                        .map(Arc::new)
                        .map_err(|e| error_chain(&e));
                    match &loaded {
                        Ok(tool) => {
                            tracing::info!(tool = %tool.name, digest = %tool.digest, path = %path.display(), "loaded tool")
                        }
                        Err(error) => {
                            tracing::warn!(path = %path.display(), %error, "skipping component")
                        }
                    }
                    loaded
                }
            };
            next.insert(path, (signature, entry));
        }
        let by_name = index_by_name(&mut next);
        let (defaults, manifest_error) = match read_manifest(&self.dir) {
            Ok(defaults) => (defaults, None),
            Err(error) => {
                tracing::warn!(%error, "ignoring the tools manifest");
                (BTreeMap::new(), Some(error))
            }
        };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = RegistryState {
            by_name,
            by_path: next,
            defaults,
            manifest_error,
        };
    }

    async fn load(&self, path: &Path) -> Result<LoadedTool, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let digest_hex = hex::encode(Sha256::digest(&bytes));
        let component = {
            let (engine, cache, digest_hex) =
                (self.engine.clone(), self.cache.clone(), digest_hex.clone());
            // Compiling is CPU-bound for up to seconds; keep it off the async workers.
            tokio::task::spawn_blocking(move || cache.load_or_compile(&engine, &digest_hex, &bytes))
                .await
                .map_err(|join| LoadError::Describe {
                    path: path.to_owned(),
                    problem: format!("compile task failed: {join}"),
                })?
                .map_err(|source| LoadError::Compile {
                    path: path.to_owned(),
                    source,
                })?
        };
        let link = |source| LoadError::Link {
            path: path.to_owned(),
            source,
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(link)?;
        let pre = ToolComponentPre::new(instance_pre).map_err(link)?;
        let described = run_describe(&self.engine, &pre, &DESCRIBE_LIMITS).await;
        let describe_error = |problem: String| LoadError::Describe {
            path: path.to_owned(),
            problem,
        };
        let json = match described.outcome {
            CallOutcome::Ok(json) => json,
            other => return Err(describe_error(format!("failed: {other:?}"))),
        };
        let descriptor: Descriptor = serde_json::from_str(&json)
            .map_err(|e| describe_error(format!("returned invalid JSON ({e}): {json}")))?;
        descriptor.check_name().map_err(describe_error)?;
        let validator = jsonschema::validator_for(&descriptor.input_schema)
            .map_err(|e| describe_error(format!("returned an invalid input_schema: {e}")))?;
        Ok(LoadedTool {
            name: descriptor.name,
            description: descriptor.description,
            input_schema: descriptor.input_schema,
            output_schema: descriptor.output_schema,
            digest: format!("sha256:{digest_hex}"),
            path: path.to_owned(),
            pre,
            validator,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// What `describe` returns.
#[derive(Debug, serde::Deserialize)]
struct Descriptor {
    name: String,
    description: String,
    input_schema: serde_json::Value,
    #[serde(default)]
    output_schema: serde_json::Value,
}

impl Descriptor {
    fn check_name(&self) -> Result<(), String> {
        let valid = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(())
        } else {
            Err(format!(
                "returned tool name {:?}; names are 1-64 chars of [a-z0-9_] starting with a letter",
                self.name
            ))
        }
    }
}

/// Builds the name index; the first file (by path) wins a duplicate name and
/// the others are turned into load errors.
fn index_by_name(
    entries: &mut HashMap<PathBuf, (FileSignature, Result<Arc<LoadedTool>, String>)>,
) -> BTreeMap<String, Arc<LoadedTool>> {
    let mut paths: Vec<PathBuf> = entries.keys().cloned().collect();
    paths.sort();
    let mut by_name: BTreeMap<String, Arc<LoadedTool>> = BTreeMap::new();
    for path in paths {
        let Some((_, loaded)) = entries.get_mut(&path) else {
            continue;
        };
        let Ok(tool) = loaded else {
            continue;
        };
        if let Some(existing) = by_name.get(&tool.name) {
            let duplicate = LoadError::DuplicateName {
                path: path.clone(),
                name: tool.name.clone(),
                other: existing.path.clone(),
            };
            *loaded = Err(duplicate.to_string());
        } else {
            by_name.insert(tool.name.clone(), Arc::clone(tool));
        }
    }
    by_name
}

fn list_components(dir: &Path) -> std::io::Result<Vec<(PathBuf, FileSignature)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|ext| ext != "wasm") {
            continue;
        }
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        files.push((
            path,
            FileSignature {
                len: meta.len(),
                modified: meta.modified().ok(),
            },
        ));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}
