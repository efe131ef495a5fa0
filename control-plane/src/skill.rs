//! Skills: instructions an agent loads when it needs them (progressive
//! disclosure).
//!
//! A skills directory holds one folder per skill. Each folder has a
//! `SKILL.md`: YAML front matter between `---` lines, then the body.
//!
//! ```text
//! skills/
//!   release-notes/
//!     SKILL.md          # ---
//!                       # name: release-notes
//!                       # description: Write release notes from a changelog. Use when …
//!                       # allowed-tools: [read_file, write_file]   # optional
//!                       # ---
//!                       # (the body: the instructions)
//!     template.md       # a resource: any other file of the folder
//! ```
//!
//! - `name`: lowercase letters, digits and single hyphens, at most 64
//!   characters, the same as the folder's name.
//! - `description`: at most 1024 characters, not empty. It is all a model sees
//!   of the skill until it loads it, so it says what the skill is for and
//!   when to use it.
//! - `allowed-tools` (optional): a list, or one string separated by commas or
//!   spaces. Once the skill is loaded, the session may call only these of
//!   its tools (plus `load_skill` and `escalate`). This narrows the agent's
//!   tools and never widens them: a listed tool the agent lacks stays
//!   unavailable.
//! - Other keys (`license`, `metadata`, …) are allowed and ignored.
//!
//! An agent lists its skills with `skills = [...]`. Its requests carry only
//! the index of those skills (name and description; [`index`]), in the
//! static part of the prompt. The `load_skill {name}` harness tool returns a
//! skill's body and the list of its resources as a tool result. The system
//! prompt never changes, so the provider's prompt cache survives a load.
//! Each load is also recorded as a `skill_loaded` event.
//!
//! A skill that breaks any of these rules stops the control plane from
//! starting, with an error naming the file and the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use harness_proto::control::v1 as control;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::agent_loop::executor::{HarnessCallError, HarnessOutput, HarnessTool, HarnessToolError};

/// Name of the harness tool that loads a skill.
pub const LOAD_SKILL: &str = "load_skill";
/// The file of a skill folder holding its front matter and body.
pub const SKILL_FILE: &str = "SKILL.md";
/// Longest skill name.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest skill description.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Largest `SKILL.md`: a body is meant to be read in one tool result.
pub const MAX_SKILL_FILE_BYTES: u64 = 256 * 1024;
/// Most resources listed for one skill (a folder with more lists this many
/// and says so).
const MAX_LISTED_RESOURCES: usize = 200;
/// The rule a denial by a loaded skill's `allowed-tools` names.
pub const SKILL_TOOLS_RULE: &str = "skill.allowed-tools";
/// Tools a skill's `allowed-tools` never takes away: loading another skill,
/// and handing the problem back.
const ALWAYS_ALLOWED: [&str; 2] = [LOAD_SKILL, crate::harness_tools::ESCALATE];

/// Why the skills directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// The skills directory could not be listed.
    #[error("cannot list skills directory {dir}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A skill file could not be read.
    #[error("cannot read skill file {file}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A skill folder or file breaks a rule (see the module docs).
    #[error("invalid skill {file}: {problem}")]
    Invalid {
        /// The `SKILL.md` (or the folder lacking one).
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// One loaded skill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    /// Its name (the folder's).
    pub name: String,
    /// What it is for and when to use it.
    pub description: String,
    /// The instructions `load_skill` returns.
    pub body: String,
    /// The tools it allows once loaded; `None`: it does not narrow them.
    pub allowed_tools: Option<Vec<String>>,
    /// The folder's other files, relative to it, sorted.
    pub resources: Vec<String>,
    /// The folder's path.
    pub dir: PathBuf,
}

impl Skill {
    /// As a session records it.
    pub fn resolved(&self) -> control::ResolvedSkill {
        control::ResolvedSkill {
            name: self.name.clone(),
            description: self.description.clone(),
        }
    }
}

/// The skills of a control plane, by name.
#[derive(Debug, Clone, Default)]
pub struct SkillCatalog {
    skills: BTreeMap<String, Arc<Skill>>,
    dir: Option<PathBuf>,
}

impl SkillCatalog {
    /// Loads every skill folder of `dir`. A directory that does not exist
    /// holds no skills (an agent listing one then fails to load, naming the
    /// directory); any invalid skill is an error.
    pub fn load_dir(dir: &Path) -> Result<Self, SkillError> {
        let mut catalog = Self {
            skills: BTreeMap::new(),
            dir: Some(dir.to_owned()),
        };
        if !dir.exists() {
            return Ok(catalog);
        }
        let read_dir_error = |source| SkillError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut folders = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
            let path = entry.map_err(read_dir_error)?.path();
            let hidden = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with('.'));
            if path.is_dir() && !hidden {
                folders.push(path);
            }
        }
        folders.sort();
        for folder in folders {
            let skill = load_skill_dir(&folder)?;
            catalog.skills.insert(skill.name.clone(), Arc::new(skill));
        }
        Ok(catalog)
    }

    /// A catalog of skills made in code (tests, embedding).
    pub fn from_skills(skills: impl IntoIterator<Item = Skill>) -> Self {
        Self {
            skills: skills
                .into_iter()
                .map(|skill| (skill.name.clone(), Arc::new(skill)))
                .collect(),
            dir: None,
        }
    }

    /// The skill called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Skill>> {
        self.skills.get(name).cloned()
    }

    /// The names of all skills, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.skills.keys().map(String::as_str)
    }

    /// Number of skills.
    pub fn len(&self) -> usize {
        self.skills.len()
    }

    /// True if there are no skills.
    pub fn is_empty(&self) -> bool {
        self.skills.is_empty()
    }

    /// Where the skills were loaded from, for error messages.
    pub fn describe_source(&self) -> String {
        match &self.dir {
            Some(dir) => format!("skills directory {}", dir.display()),
            None => "the skills given to the control plane".to_owned(),
        }
    }
}

/// Loads the skill of one folder.
fn load_skill_dir(folder: &Path) -> Result<Skill, SkillError> {
    let file = folder.join(SKILL_FILE);
    let invalid = |problem: String| SkillError::Invalid {
        file: file.clone(),
        problem,
    };
    let metadata = std::fs::metadata(&file).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => invalid(format!(
            "the folder has no {SKILL_FILE}; every folder of the skills directory is a skill"
        )),
        _ => SkillError::Read {
            file: file.clone(),
            source,
        },
    })?;
    if metadata.len() > MAX_SKILL_FILE_BYTES {
        return Err(invalid(format!(
            "{} bytes; a skill file holds at most {MAX_SKILL_FILE_BYTES} (move details into \
             resources the agent reads when it needs them)",
            metadata.len()
        )));
    }
    let text = std::fs::read_to_string(&file).map_err(|source| SkillError::Read {
        file: file.clone(),
        source,
    })?;
    let parsed = parse_skill_file(&text).map_err(&invalid)?;
    let folder_name = folder
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    if parsed.name != folder_name {
        return Err(invalid(format!(
            "name \"{}\" differs from its folder's name \"{folder_name}\"",
            parsed.name
        )));
    }
    let resources = list_resources(folder).map_err(|source| SkillError::ReadDir {
        dir: folder.to_owned(),
        source,
    })?;
    Ok(Skill {
        name: parsed.name,
        description: parsed.description,
        body: parsed.body,
        allowed_tools: parsed.allowed_tools,
        resources,
        dir: folder.to_owned(),
    })
}

/// The folder's files besides `SKILL.md`, relative and sorted, at most
/// [`MAX_LISTED_RESOURCES`].
fn list_resources(folder: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![folder.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(folder)
                && relative != Path::new(SKILL_FILE)
            {
                found.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found.sort();
    found.truncate(MAX_LISTED_RESOURCES);
    Ok(found)
}

/// A `SKILL.md`, parsed and checked (the folder name aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSkill {
    /// `name`.
    pub name: String,
    /// `description`, trimmed.
    pub description: String,
    /// `allowed-tools`, if given.
    pub allowed_tools: Option<Vec<String>>,
    /// Everything after the front matter, trimmed.
    pub body: String,
}

/// The front matter's keys.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FrontMatter {
    name: Option<String>,
    description: Option<String>,
    allowed_tools: Option<ToolList>,
}

/// `allowed-tools` as a YAML list or as one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ToolList {
    List(Vec<String>),
    Text(String),
}

impl ToolList {
    fn into_names(self) -> Vec<String> {
        let names: Vec<String> = match self {
            Self::List(names) => names,
            Self::Text(text) => text
                .split(|c: char| c == ',' || c.is_whitespace())
                .map(str::to_owned)
                .collect(),
        };
        names
            .into_iter()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect()
    }
}

/// Parses a `SKILL.md`: front matter between `---` lines, then the body.
pub fn parse_skill_file(text: &str) -> Result<ParsedSkill, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or_default();
    if first.trim_end() != "---" {
        return Err(
            "it must start with YAML front matter: a line \"---\", the keys name and \
                    description, and another \"---\""
                .to_owned(),
        );
    }
    let mut yaml = String::new();
    let mut closed = false;
    for line in lines.by_ref() {
        if line.trim_end() == "---" {
            closed = true;
            break;
        }
        yaml.push_str(line);
    }
    if !closed {
        return Err("the front matter has no closing \"---\" line".to_owned());
    }
    let body: String = lines.collect();
    let front: FrontMatter = serde_yaml_ng::from_str(&yaml)
        .map_err(|error| format!("the front matter is not valid YAML: {error}"))?;
    let name = front
        .name
        .ok_or_else(|| "the front matter has no name".to_owned())?;
    check_name(&name)?;
    let description = front
        .description
        .map(|description| description.trim().to_owned())
        .unwrap_or_default();
    if description.is_empty() {
        return Err(
            "the front matter has no description (it is all a model sees of the \
                    skill before loading it)"
                .to_owned(),
        );
    }
    let chars = description.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(format!(
            "the description has {chars} characters; at most {MAX_DESCRIPTION_CHARS}"
        ));
    }
    let body = body.trim().to_owned();
    if body.is_empty() {
        return Err("the body after the front matter is empty".to_owned());
    }
    Ok(ParsedSkill {
        name,
        description,
        allowed_tools: front.allowed_tools.map(ToolList::into_names),
        body,
    })
}

/// A skill name: lowercase ASCII letters, digits and single hyphens, not at
/// either end, at most [`MAX_NAME_CHARS`].
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > MAX_NAME_CHARS {
        return Err(format!(
            "name \"{name}\" has {} characters; at most {MAX_NAME_CHARS}",
            name.len()
        ));
    }
    let allowed = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !allowed || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(format!(
            "name \"{name}\" must be lowercase letters, digits and single hyphens (not first \
             or last)"
        ));
    }
    Ok(())
}

/// The skills index placed after the system prompt: one line per skill, in
/// the agent's order. Empty without skills. Depends on nothing but the
/// recorded skills, so every request of a session carries the same bytes.
pub fn index(skills: &[control::ResolvedSkill]) -> String {
    if skills.is_empty() {
        return String::new();
    }
    let mut index = format!(
        "# Skills\n\nSkills are instructions for particular tasks. Before a task one of them \
         covers, call {LOAD_SKILL} with its name to read it.\n"
    );
    for skill in skills {
        index.push_str(&format!(
            "\n- {}: {}",
            skill.name,
            one_line(&skill.description)
        ));
    }
    index
}

/// `text` with its line breaks turned into spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The system text a model receives: the system prompt, then the skills
/// index (when there is one).
pub fn system_text(system_prompt: &str, skills: &[control::ResolvedSkill]) -> String {
    let index = index(skills);
    match (system_prompt.is_empty(), index.is_empty()) {
        (_, true) => system_prompt.to_owned(),
        (true, false) => index,
        (false, false) => format!("{system_prompt}\n\n{index}"),
    }
}

/// The tools a session may still call after loading skills: each load
/// that narrows intersects the set. `None`: no loaded skill narrows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkillRestriction {
    /// The allowed tools, and the skills that narrowed them, in load order.
    allowed: Option<(Vec<String>, Vec<String>)>,
}

impl SkillRestriction {
    /// Takes in one `skill_loaded` event.
    pub fn apply(&mut self, loaded: &control::SkillLoaded) {
        let Some(tools) = &loaded.allowed_tools else {
            return;
        };
        match &mut self.allowed {
            Some((allowed, by)) => {
                allowed.retain(|tool| tools.tools.contains(tool));
                by.push(loaded.name.clone());
            }
            None => self.allowed = Some((tools.tools.clone(), vec![loaded.name.clone()])),
        }
    }

    /// Why a call of `tool` is refused by the loaded skills; `None` if they
    /// allow it.
    pub fn refusal(&self, tool: &str) -> Option<String> {
        let (allowed, by) = self.allowed.as_ref()?;
        if ALWAYS_ALLOWED.contains(&tool) || allowed.iter().any(|listed| listed == tool) {
            return None;
        }
        let shown = if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        };
        let names = by
            .iter()
            .map(|name| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(" and ");
        let skills = if by.len() == 1 {
            format!("skill {names} is")
        } else {
            format!("skills {names} are")
        };
        Some(format!(
            "tool \"{tool}\" is not allowed while {skills} loaded; allowed: {shown}"
        ))
    }
}

/// The input of `load_skill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadSkillInput {
    name: String,
    resource: Option<String>,
}

/// Largest resource `load_skill` returns (its head, marked, beyond that).
pub const MAX_RESOURCE_BYTES: usize = 64 * 1024;

/// `load_skill {name, resource?}`: a skill's body and the list of its
/// resources, or one resource's text.
#[derive(Debug)]
pub struct LoadSkillTool {
    skills: Arc<SkillCatalog>,
}

impl LoadSkillTool {
    /// The tool, serving `skills`.
    pub fn new(skills: Arc<SkillCatalog>) -> Self {
        Self { skills }
    }
}

/// What loading `skill` returns: the tool result's JSON, and the event
/// recording it (its call id and the narrowing to the agent's tools are
/// the loop's to fill in: [`recorded_load`]).
pub fn load_output(skill: &Skill) -> (String, control::SkillLoaded) {
    let output = serde_json::json!({
        "name": skill.name,
        "instructions": skill.body,
        "resources": skill.resources,
    });
    let loaded = control::SkillLoaded {
        call_id: String::new(),
        name: skill.name.clone(),
        body_sha256: hex_sha256(skill.body.as_bytes()),
        resources: skill.resources.clone(),
        allowed_tools: skill
            .allowed_tools
            .clone()
            .map(|tools| control::SkillTools { tools }),
    };
    (output.to_string(), loaded)
}

/// The `skill_loaded` event of call `call_id`, its allowed tools narrowed
/// to `agent_tools` (a skill never widens them).
pub fn recorded_load(
    loaded: &control::SkillLoaded,
    call_id: &str,
    agent_tools: &[String],
) -> control::SkillLoaded {
    control::SkillLoaded {
        call_id: call_id.to_owned(),
        allowed_tools: loaded
            .allowed_tools
            .as_ref()
            .map(|allowed| control::SkillTools {
                tools: agent_tools
                    .iter()
                    .filter(|tool| allowed.tools.contains(tool))
                    .cloned()
                    .collect(),
            }),
        ..loaded.clone()
    }
}

/// One resource of `skill`, as `load_skill {name, resource}` returns it.
fn resource_output(skill: &Skill, resource: &str) -> Result<String, HarnessToolError> {
    // Only a listed resource is read: the name is never joined as given.
    let listed = skill
        .resources
        .iter()
        .find(|listed| listed.as_str() == resource)
        .ok_or_else(|| HarnessToolError {
            kind: control::ToolErrorKind::NotFound,
            message: format!(
                "skill \"{}\" has no resource \"{resource}\"; its resources: {}",
                skill.name,
                if skill.resources.is_empty() {
                    "none".to_owned()
                } else {
                    skill.resources.join(", ")
                }
            ),
        })?;
    let bytes = std::fs::read(skill.dir.join(listed)).map_err(|error| HarnessToolError {
        kind: control::ToolErrorKind::Internal,
        message: format!(
            "cannot read resource \"{listed}\" of skill \"{}\": {error}",
            skill.name
        ),
    })?;
    let truncated = bytes.len() > MAX_RESOURCE_BYTES;
    let shown = &bytes[..bytes.len().min(MAX_RESOURCE_BYTES)];
    let text = String::from_utf8_lossy(shown);
    let mut output = serde_json::json!({
        "name": skill.name,
        "resource": listed,
        "content": text,
    });
    if truncated {
        output["truncated"] = serde_json::json!(format!(
            "the first {MAX_RESOURCE_BYTES} of {} bytes",
            bytes.len()
        ));
    }
    Ok(output.to_string())
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl HarnessTool for LoadSkillTool {
    fn name(&self) -> &str {
        LOAD_SKILL
    }

    fn description(&self) -> &str {
        "Read the instructions of one of your skills (listed under \"Skills\" in your \
         instructions) before a task it covers. Returns its instructions and the names of its \
         resource files; name one as `resource` to read it."
    }

    fn input_schema_json(&self) -> &str {
        r#"{"type":"object","properties":{"name":{"type":"string","minLength":1,"description":"The skill's name, as the Skills list gives it."},"resource":{"type":"string","minLength":1,"description":"One of the skill's resource files, as load_skill listed it; leave it out to read the instructions."}},"required":["name"],"additionalProperties":false}"#
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>> {
        let skills = Arc::clone(&self.skills);
        Box::pin(async move {
            let input: LoadSkillInput =
                serde_json::from_str(&call.input_json).map_err(|error| HarnessToolError {
                    kind: control::ToolErrorKind::InvalidInput,
                    message: format!("load_skill needs {{\"name\": …}}: {error}"),
                })?;
            let skill = skills.get(&input.name).ok_or_else(|| HarnessToolError {
                kind: control::ToolErrorKind::NotFound,
                message: format!(
                    "skill \"{}\" is no longer in the control plane's {}",
                    input.name,
                    skills.describe_source()
                ),
            })?;
            if let Some(resource) = &input.resource {
                return Ok(HarnessOutput::json(resource_output(&skill, resource)?));
            }
            let (output_json, loaded) = load_output(&skill);
            Ok(HarnessOutput {
                skill: Some(loaded),
                ..HarnessOutput::json(output_json)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const RELEASE_NOTES: &str = "---\nname: release-notes\ndescription: >\n  Write release notes from a changelog.\n  Use when asked for notes.\nallowed-tools: read_file, write_file\nlicense: MIT\n---\n\n# Release notes\n\nRead CHANGELOG.md, then write NOTES.md.\n";

    fn write_skill(dir: &Path, folder: &str, text: &str) -> PathBuf {
        let folder = dir.join(folder);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(SKILL_FILE), text).unwrap();
        folder
    }

    #[test]
    fn a_skill_file_parses_into_name_description_tools_and_body() {
        assert_eq!(
            parse_skill_file(RELEASE_NOTES).unwrap(),
            ParsedSkill {
                name: "release-notes".to_owned(),
                description: "Write release notes from a changelog. Use when asked for notes."
                    .to_owned(),
                allowed_tools: Some(vec!["read_file".to_owned(), "write_file".to_owned()]),
                body: "# Release notes\n\nRead CHANGELOG.md, then write NOTES.md.".to_owned(),
            }
        );
        let listed = "---\nname: x\ndescription: d\nallowed-tools: [exec]\n---\nbody";
        assert_eq!(
            parse_skill_file(listed).unwrap().allowed_tools,
            Some(vec!["exec".to_owned()])
        );
        let crlf = "---\r\nname: x\r\ndescription: d\r\n---\r\nbody\r\n";
        assert_eq!(parse_skill_file(crlf).unwrap().body, "body");
    }

    #[test]
    fn invalid_skill_files_say_why() {
        let long_name = format!("---\nname: {}\ndescription: d\n---\nb", "a".repeat(65));
        let long_description = format!("---\nname: x\ndescription: {}\n---\nb", "d".repeat(1025));
        let cases = [
            (
                "no front matter",
                "# just a body",
                "it must start with YAML front matter",
            ),
            (
                "unclosed",
                "---\nname: x\ndescription: d\nbody",
                "no closing \"---\"",
            ),
            ("bad yaml", "---\nname: [x\n---\nb", "not valid YAML"),
            ("no name", "---\ndescription: d\n---\nb", "has no name"),
            (
                "upper case",
                "---\nname: Release\ndescription: d\n---\nb",
                "must be lowercase",
            ),
            (
                "double hyphen",
                "---\nname: a--b\ndescription: d\n---\nb",
                "single hyphens",
            ),
            (
                "long name",
                long_name.as_str(),
                "has 65 characters; at most 64",
            ),
            (
                "no description",
                "---\nname: x\n---\nb",
                "has no description",
            ),
            (
                "long description",
                long_description.as_str(),
                "1025 characters; at most 1024",
            ),
            (
                "empty body",
                "---\nname: x\ndescription: d\n---\n  \n",
                "body after the front matter is empty",
            ),
        ];
        for (case, text, expected) in cases {
            let problem = parse_skill_file(text).expect_err(case);
            assert!(problem.contains(expected), "{case}: {problem}");
        }
    }

    #[test]
    fn a_directory_loads_with_resources_and_an_invalid_skill_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_skill(dir.path(), "release-notes", RELEASE_NOTES);
        std::fs::write(folder.join("template.md"), "## Added").unwrap();
        std::fs::create_dir_all(folder.join("examples")).unwrap();
        std::fs::write(folder.join("examples/one.md"), "1").unwrap();
        let catalog = SkillCatalog::load_dir(dir.path()).unwrap();
        let skill = catalog.get("release-notes").unwrap();
        assert_eq!(skill.resources, ["examples/one.md", "template.md"]);
        assert_eq!(catalog.names().collect::<Vec<_>>(), ["release-notes"]);

        write_skill(dir.path(), "other-name", RELEASE_NOTES);
        let error = SkillCatalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid skill {}: name \"release-notes\" differs from its folder's name \"other-name\"",
                dir.path().join("other-name").join(SKILL_FILE).display()
            )
        );
        std::fs::remove_dir_all(dir.path().join("other-name")).unwrap();
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let error = SkillCatalog::load_dir(dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("the folder has no SKILL.md"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_directory_holds_no_skills() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = SkillCatalog::load_dir(&dir.path().join("absent")).unwrap();
        assert!(catalog.is_empty());
    }

    #[test]
    fn the_index_lists_name_and_description_only_after_the_system_prompt() {
        let skills = [
            control::ResolvedSkill {
                name: "release-notes".to_owned(),
                description: "Write release notes.\nUse when asked.".to_owned(),
            },
            control::ResolvedSkill {
                name: "triage".to_owned(),
                description: "Sort bugs.".to_owned(),
            },
        ];
        assert_eq!(
            system_text("You are careful.", &skills),
            "You are careful.\n\n# Skills\n\nSkills are instructions for particular tasks. \
             Before a task one of them covers, call load_skill with its name to read it.\n\n\
             - release-notes: Write release notes. Use when asked.\n- triage: Sort bugs."
        );
        assert_eq!(system_text("You are careful.", &[]), "You are careful.");
    }

    fn loaded(name: &str, tools: Option<&[&str]>) -> control::SkillLoaded {
        control::SkillLoaded {
            name: name.to_owned(),
            allowed_tools: tools.map(|tools| control::SkillTools {
                tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn allowed_tools_narrow_to_the_agents_and_each_narrowing_load_intersects() {
        let agent_tools = ["read_file", "write_file", "load_skill"].map(str::to_owned);
        let recorded = recorded_load(
            &loaded("a", Some(&["read_file", "exec"])),
            "call_1_0",
            &agent_tools,
        );
        assert_eq!(recorded.call_id, "call_1_0");
        assert_eq!(
            recorded.allowed_tools,
            Some(control::SkillTools {
                tools: vec!["read_file".to_owned()]
            })
        );
        let mut restriction = SkillRestriction::default();
        restriction.apply(&loaded("free", None));
        assert_eq!(restriction.refusal("write_file"), None);
        restriction.apply(&recorded);
        assert_eq!(restriction.refusal("read_file"), None);
        assert_eq!(restriction.refusal(LOAD_SKILL), None);
        assert_eq!(restriction.refusal("escalate"), None);
        assert_eq!(
            restriction.refusal("write_file").unwrap(),
            "tool \"write_file\" is not allowed while skill \"a\" is loaded; allowed: read_file"
        );
        restriction.apply(&loaded("b", Some(&["write_file"])));
        assert_eq!(
            restriction.refusal("read_file").unwrap(),
            "tool \"read_file\" is not allowed while skills \"a\" and \"b\" are loaded; allowed: none"
        );
    }

    #[tokio::test]
    async fn load_skill_returns_the_body_and_resources_and_reads_only_listed_resources() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_skill(dir.path(), "release-notes", RELEASE_NOTES);
        std::fs::write(folder.join("template.md"), "## Added").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "no").unwrap();
        let tool = LoadSkillTool::new(Arc::new(SkillCatalog::load_dir(dir.path()).unwrap()));
        let call = |input: &str| control::HarnessToolCall {
            invocation_id: "s1:call_1_0".to_owned(),
            tool: LOAD_SKILL.to_owned(),
            input_json: input.to_owned(),
            delegation: None,
        };
        let output = tool
            .call(call(r#"{"name":"release-notes"}"#))
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&output.output_json).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "release-notes",
                "instructions": "# Release notes\n\nRead CHANGELOG.md, then write NOTES.md.",
                "resources": ["template.md"],
            })
        );
        let loaded = output.skill.unwrap();
        assert_eq!(loaded.name, "release-notes");
        assert_eq!(loaded.body_sha256.len(), 64);
        let resource = tool
            .call(call(r#"{"name":"release-notes","resource":"template.md"}"#))
            .await
            .unwrap();
        assert_eq!(
            resource.output_json,
            r###"{"content":"## Added","name":"release-notes","resource":"template.md"}"###
        );
        assert_eq!(resource.skill, None);
        let Err(HarnessCallError::Failed(escape)) = tool
            .call(call(
                r#"{"name":"release-notes","resource":"../secret.txt"}"#,
            ))
            .await
        else {
            panic!("a path outside the listed resources is refused");
        };
        assert_eq!(escape.kind, control::ToolErrorKind::NotFound);
        assert!(escape.message.contains("has no resource \"../secret.txt\""));
    }
}
