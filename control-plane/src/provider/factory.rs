//! Builds the network providers agents use, one per endpoint, and looks up
//! model prices.
//!
//! Agents that share an endpoint (provider kind + base URL + key variable)
//! share one [`HttpProvider`] and so one circuit breaker: an outage of that
//! endpoint is seen once, by everyone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::anthropic::{self, AnthropicFormat};
use super::config::{ProviderConfig, ProvidersConfig};
use super::http::{HttpProvider, HttpProviderError, WireFormat};
use super::openai::{self, OpenAiFormat};
use super::{ModelProvider, ProviderKind};
use crate::budget::ModelPrice;
use crate::context::ModelSpec;

/// Reads an environment variable.
pub type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Why a provider could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// The scripted provider is built from its script, not here.
    #[error("provider \"scripted\" has no endpoint")]
    NotNetworked,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP provider")]
    Http(#[source] HttpProviderError),
}

/// Network providers by endpoint, and the price table.
pub struct ProviderFactory {
    config: ProvidersConfig,
    prices: BTreeMap<String, ModelPrice>,
    models: BTreeMap<String, ModelSpec>,
    env: EnvLookup,
    built: HashMap<(ProviderKind, String, Option<String>), Arc<HttpProvider>>,
}

impl std::fmt::Debug for ProviderFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderFactory")
            .field("config", &self.config)
            .field("prices", &self.prices)
            .field("endpoints", &self.built.len())
            .finish_non_exhaustive()
    }
}

impl ProviderFactory {
    /// A factory reading keys and default base URLs from the process environment.
    pub fn new(config: ProvidersConfig, prices: BTreeMap<String, ModelPrice>) -> Self {
        Self::with_env(
            config,
            prices,
            Box::new(|name: &str| std::env::var(name).ok()),
        )
    }

    /// A factory with its own environment (tests).
    pub fn with_env(
        config: ProvidersConfig,
        prices: BTreeMap<String, ModelPrice>,
        env: EnvLookup,
    ) -> Self {
        Self {
            config,
            prices,
            models: BTreeMap::new(),
            env,
            built: HashMap::new(),
        }
    }

    /// With the model catalog `models` (context windows, output limits).
    pub fn with_models(mut self, models: BTreeMap<String, ModelSpec>) -> Self {
        self.models = models;
        self
    }

    /// What the catalog says of `model`.
    pub fn model_spec(&self, model: &str) -> Option<ModelSpec> {
        self.models.get(model).copied()
    }

    /// The price of `model`, if the table has it.
    pub fn price(&self, model: &str) -> Option<ModelPrice> {
        self.prices.get(model).copied()
    }

    /// The provider for `kind` at the agent's `base_url` (else the
    /// configuration's, else the environment's, else the public API) with the
    /// key from the variable `api_key_env` (else the configuration's, else
    /// the provider's usual one).
    pub fn network(
        &mut self,
        kind: ProviderKind,
        base_url: Option<&str>,
        api_key_env: Option<&str>,
    ) -> Result<Arc<dyn ModelProvider>, FactoryError> {
        let (config, url_variable, key_variable, public_url): (&ProviderConfig, _, _, _) =
            match kind {
                ProviderKind::Openai => (
                    &self.config.openai,
                    "OPENAI_BASE_URL",
                    "OPENAI_API_KEY",
                    openai::DEFAULT_BASE_URL,
                ),
                ProviderKind::Anthropic => (
                    &self.config.anthropic,
                    "ANTHROPIC_BASE_URL",
                    "ANTHROPIC_API_KEY",
                    anthropic::DEFAULT_BASE_URL,
                ),
                ProviderKind::Scripted => return Err(FactoryError::NotNetworked),
            };
        let base_url = base_url
            .map(str::to_owned)
            .or_else(|| config.base_url.clone())
            .or_else(|| (self.env)(url_variable))
            .unwrap_or_else(|| public_url.to_owned());
        let key_variable = api_key_env
            .map(str::to_owned)
            .or_else(|| config.api_key_env.clone())
            .unwrap_or_else(|| key_variable.to_owned());
        let key = (base_url.clone(), Some(key_variable.clone()));
        if let Some(provider) = self.built.get(&(kind, key.0.clone(), key.1.clone())) {
            return Ok(Arc::clone(provider) as Arc<dyn ModelProvider>);
        }
        let api_key = (self.env)(&key_variable).filter(|key| !key.is_empty());
        let format: Box<dyn WireFormat> = match kind {
            ProviderKind::Anthropic => Box::new(AnthropicFormat),
            _ => Box::new(OpenAiFormat),
        };
        let provider = Arc::new(
            HttpProvider::new(
                format,
                &base_url,
                api_key.as_deref(),
                config.http_settings(),
            )
            .map_err(FactoryError::Http)?,
        );
        self.built
            .insert((kind, key.0, key.1), Arc::clone(&provider));
        Ok(provider)
    }

    /// Endpoints built so far ("provider base-url"), sorted.
    pub fn endpoints(&self) -> Vec<String> {
        let mut endpoints: Vec<String> = self
            .built
            .values()
            .map(|provider| provider.endpoint().to_owned())
            .collect();
        endpoints.sort();
        endpoints
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn factory(env: &'static [(&'static str, &'static str)]) -> ProviderFactory {
        ProviderFactory::with_env(
            ProvidersConfig::default(),
            BTreeMap::new(),
            Box::new(move |name: &str| {
                env.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }),
        )
    }

    #[tokio::test]
    async fn base_urls_come_from_the_agent_then_config_then_environment_then_default() {
        let mut from_env = factory(&[("OPENAI_BASE_URL", "http://env:1/v1")]);
        from_env.network(ProviderKind::Openai, None, None).unwrap();
        from_env
            .network(ProviderKind::Openai, Some("http://agent:2/v1"), None)
            .unwrap();
        from_env
            .network(ProviderKind::Anthropic, None, None)
            .unwrap();
        assert_eq!(
            from_env.endpoints(),
            [
                "anthropic https://api.anthropic.com",
                "openai http://agent:2/v1",
                "openai http://env:1/v1",
            ]
        );
        let mut configured = ProviderFactory::with_env(
            ProvidersConfig {
                openai: ProviderConfig {
                    base_url: Some("http://config:3/v1".to_owned()),
                    ..ProviderConfig::default()
                },
                ..ProvidersConfig::default()
            },
            BTreeMap::new(),
            Box::new(|_: &str| Some("http://env:1/v1".to_owned())),
        );
        configured
            .network(ProviderKind::Openai, None, None)
            .unwrap();
        assert_eq!(configured.endpoints(), ["openai http://config:3/v1"]);
    }

    #[tokio::test]
    async fn agents_on_one_endpoint_share_a_provider() {
        let mut factory = factory(&[]);
        let first = factory.network(ProviderKind::Openai, None, None).unwrap();
        let second = factory.network(ProviderKind::Openai, None, None).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(factory.endpoints().len(), 1);
        assert!(matches!(
            factory.network(ProviderKind::Scripted, None, None),
            Err(FactoryError::NotNetworked)
        ));
    }
}
