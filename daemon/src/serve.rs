//! Serving a daemon: its own gRPC services plus the standard health service
//! and server reflection, on every listener at once, until shutdown.
//!
//! ```no_run
//! # async fn example<S>(service: S) -> Result<(), Box<dyn std::error::Error>>
//! # where S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible,
//! #     Response = http::Response<tonic::body::Body>> + tonic::server::NamedService
//! #     + Clone + Send + Sync + 'static, S::Future: Send + 'static {
//! use harness_daemon::{DaemonServer, Exposure, Listeners};
//! # let descriptor_set: &'static [u8] = &[];
//! let listeners = Listeners::bind_all(
//!     &["unix:/run/harness/x.sock".parse()?, "127.0.0.1:7071".parse()?],
//!     Exposure::LoopbackOnly,
//! )
//! .await?;
//! DaemonServer::new()
//!     .describe(descriptor_set) // the .proto files of `service`
//!     .add_service(service)
//!     .serve(listeners, async { /* a shutdown signal */ })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! What every daemon gets:
//! - `grpc.health.v1.Health`: the server (`""`) and each of the daemon's
//!   services are SERVING from the start of [`DaemonServer::serve`]; when
//!   the shutdown future resolves they turn NOT_SERVING (so load balancers
//!   and watchers stop sending work) before in-flight calls drain.
//! - `grpc.reflection.v1` and `v1alpha`: they list exactly the services this
//!   server serves, and describe only the `.proto` files those need; a
//!   service without a descriptor is an error at start, not a hole.
//! - One set of services for all listeners (Unix sockets and TCP alike).
//! - [`DaemonServer::layer`]: a [`tower::Layer`] around every request
//!   (health and reflection included), where auth, tracing and metrics plug
//!   in.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;

use futures::future::try_join_all;
use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service};

use crate::address::ListenAddress;
use crate::listener::{Listeners, Socket};

/// Name of the standard health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// Name of the v1 reflection service.
pub const REFLECTION_V1_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
/// Name of the v1alpha reflection service.
pub const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Why serving could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No listener was given.
    #[error("nothing to listen on: give at least one listen address")]
    NoListeners,
    /// A registered descriptor set does not decode.
    #[error("a registered file descriptor set is not valid")]
    BadDescriptorSet(#[source] prost::DecodeError),
    /// A service has no registered descriptor, so reflection cannot
    /// describe it.
    #[error(
        "no registered file descriptor describes service {0}; register its descriptor set with \
         DaemonServer::describe"
    )]
    Undescribed(String),
    /// A file imports a file that no registered set holds.
    #[error("{file} imports {dependency}, which no registered descriptor set holds")]
    MissingDependency {
        /// The importing file.
        file: String,
        /// The missing file.
        dependency: String,
    },
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// Serving one listener failed.
    #[error("the gRPC server on {address} failed")]
    Transport {
        /// The listener's address.
        address: ListenAddress,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A daemon's gRPC server: its services, the descriptors reflection serves
/// for them, and the layers around them. See the [module docs](self).
pub struct DaemonServer<L = Identity> {
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    health: HealthReporter,
    layer: L,
    shutdown_hooks: Vec<Box<dyn FnOnce() + Send>>,
}

impl<L> std::fmt::Debug for DaemonServer<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonServer")
            .field("service_names", &self.service_names)
            .finish_non_exhaustive()
    }
}

impl Default for DaemonServer<Identity> {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonServer<Identity> {
    /// A server with only health and reflection, and no layers.
    pub fn new() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            routes,
            service_names: Vec::new(),
            descriptor_sets: vec![tonic_health::pb::FILE_DESCRIPTOR_SET],
            health,
            layer: Identity::new(),
            shutdown_hooks: Vec::new(),
        }
    }
}

impl<L> DaemonServer<L> {
    /// Registers an encoded `FileDescriptorSet` holding the `.proto` files of
    /// services added with [`DaemonServer::add_service`]. It may hold more
    /// (another daemon's contracts, say): reflection serves only the files
    /// this server's services need.
    pub fn describe(mut self, encoded_file_descriptor_set: &'static [u8]) -> Self {
        self.descriptor_sets.push(encoded_file_descriptor_set);
        self
    }

    /// Adds one of the daemon's own services; health and reflection report
    /// it under its fully-qualified name.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Error = Infallible, Response = http::Response<Body>>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Wraps every request in `layer`. The first layer added is the
    /// outermost: it sees a request first and its response last.
    pub fn layer<N>(self, layer: N) -> DaemonServer<Stack<N, L>> {
        DaemonServer {
            routes: self.routes,
            service_names: self.service_names,
            descriptor_sets: self.descriptor_sets,
            health: self.health,
            layer: Stack::new(layer, self.layer),
            shutdown_hooks: self.shutdown_hooks,
        }
    }

    /// Runs `hook` when the shutdown future resolves, after health turns
    /// NOT_SERVING and before in-flight calls drain (e.g. to end streams
    /// that would otherwise never finish).
    pub fn on_shutdown(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.shutdown_hooks.push(Box::new(hook));
        self
    }

    /// The health reporter, to mark a service NOT_SERVING while it cannot
    /// do its work.
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Every service this server answers, as reflection lists them.
    pub fn served_service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            HEALTH_SERVICE,
            REFLECTION_V1_SERVICE,
            REFLECTION_V1ALPHA_SERVICE,
        ]
        .into_iter()
        .chain(self.service_names.iter().copied())
        .map(str::to_owned)
        .collect();
        names.sort();
        names
    }

    /// Serves on every listener until `shutdown` resolves; then health turns
    /// NOT_SERVING, the shutdown hooks run, listeners close, in-flight calls
    /// drain, and the Unix socket files are removed.
    pub async fn serve<F>(
        self,
        listeners: impl Into<Listeners>,
        shutdown: F,
    ) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send,
        L: Layer<Routes>,
        L::Service:
            Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
        <L::Service as Service<http::Request<Body>>>::Future: Send,
        <L::Service as Service<http::Request<Body>>>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        let listeners = listeners.into();
        if listeners.is_empty() {
            return Err(ServeError::NoListeners);
        }
        let mut routes = self.routes;
        let descriptors = own_descriptors(&self.descriptor_sets, &self.service_names)?;
        routes.add_service(
            reflection_builder(&descriptors, &self.service_names)
                .build_v1()
                .map_err(ServeError::Reflection)?,
        );
        routes.add_service(
            reflection_builder(&descriptors, &self.service_names)
                .build_v1alpha()
                .map_err(ServeError::Reflection)?,
        );
        let service = self.layer.layer(routes.routes().prepare());

        let health_names: Vec<&'static str> = std::iter::once("")
            .chain(self.service_names.iter().copied())
            .collect();
        set_health(&self.health, &health_names, ServingStatus::Serving).await;

        let (stop, stopped) = watch::channel(false);
        let servers = try_join_all(listeners.into_vec().into_iter().map(|listener| {
            let address = listener.local_address().clone();
            let service = service.clone();
            let mut stopped = stopped.clone();
            let signal = async move {
                // An error means the sender is gone: stop too.
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            async move {
                let served = match listener.into_socket() {
                    Socket::Tcp(tcp) => {
                        let incoming = TcpIncoming::from(tcp).with_nodelay(Some(true));
                        Server::builder()
                            .serve_with_incoming_shutdown(service, incoming, signal)
                            .await
                    }
                    Socket::Unix(unix, file) => {
                        let incoming = UnixListenerStream::new(unix);
                        let served = Server::builder()
                            .serve_with_incoming_shutdown(service, incoming, signal)
                            .await;
                        file.remove();
                        served
                    }
                };
                served.map_err(|source| ServeError::Transport { address, source })
            }
        }));
        let hooks = self.shutdown_hooks;
        let health = self.health;
        let announce = async move {
            shutdown.await;
            set_health(&health, &health_names, ServingStatus::NotServing).await;
            for hook in hooks {
                hook();
            }
            stop.send_replace(true);
            // Keep the sender (and so the listeners' signal) alive until
            // every server has drained.
            std::future::pending::<Infallible>().await
        };
        tokio::pin!(servers, announce);
        tokio::select! {
            served = &mut servers => served.map(|_| ()),
            never = &mut announce => match never {},
        }
    }
}

async fn set_health(health: &HealthReporter, names: &[&str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// Reflection over `descriptors`, listing the daemon's own services, health
/// and both reflection versions.
fn reflection_builder<'b>(
    descriptors: &FileDescriptorSet,
    own_services: &[&'static str],
) -> tonic_reflection::server::Builder<'b> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(descriptors.clone())
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    [
        HEALTH_SERVICE,
        REFLECTION_V1_SERVICE,
        REFLECTION_V1ALPHA_SERVICE,
    ]
    .into_iter()
    .chain(own_services.iter().copied())
    .fold(builder, |builder, name| builder.with_service_name(name))
}

/// The files that define `services` (plus health), and everything they
/// import, from the registered sets: reflection describes nothing else.
fn own_descriptors(
    encoded_sets: &[&[u8]],
    services: &[&str],
) -> Result<FileDescriptorSet, ServeError> {
    let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    for encoded in encoded_sets {
        let set = FileDescriptorSet::decode(*encoded).map_err(ServeError::BadDescriptorSet)?;
        for file in set.file {
            files.entry(file.name().to_owned()).or_insert(file);
        }
    }
    let mut wanted: Vec<String> = Vec::new();
    for service in std::iter::once(HEALTH_SERVICE).chain(services.iter().copied()) {
        let defining = files
            .values()
            .find(|file| {
                file.service
                    .iter()
                    .any(|s| qualified(file.package(), s.name()) == service)
            })
            .ok_or_else(|| ServeError::Undescribed(service.to_owned()))?;
        wanted.push(defining.name().to_owned());
    }
    let mut kept: BTreeSet<String> = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if !kept.insert(name.clone()) {
            continue;
        }
        let Some(file) = files.get(&name) else {
            continue;
        };
        for dependency in &file.dependency {
            if !files.contains_key(dependency) {
                return Err(ServeError::MissingDependency {
                    file: name.clone(),
                    dependency: dependency.clone(),
                });
            }
            wanted.push(dependency.clone());
        }
    }
    Ok(FileDescriptorSet {
        file: files
            .into_iter()
            .filter(|(name, _)| kept.contains(name))
            .map(|(_, file)| file)
            .collect(),
    })
}

fn qualified(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_owned()
    } else {
        format!("{package}.{name}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use futures::StreamExt;
    use prost_types::{FileDescriptorProto, ServiceDescriptorProto};
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    use super::*;
    use crate::client::connect_lazy;
    use crate::listener::{Exposure, Listener};

    /// A service of our own, `test.v1.Probe`, answering UNIMPLEMENTED.
    #[derive(Clone)]
    struct Probe;

    impl NamedService for Probe {
        const NAME: &'static str = "test.v1.Probe";
    }

    impl Service<http::Request<Body>> for Probe {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(tonic::Status::unimplemented("probe").into_http()))
        }
    }

    /// Descriptors of `test.v1.Probe` and of a service we do not serve.
    fn descriptor_set() -> &'static [u8] {
        let file = |name: &str, package: &str, service: &str| FileDescriptorProto {
            name: Some(name.to_owned()),
            package: Some(package.to_owned()),
            service: vec![ServiceDescriptorProto {
                name: Some(service.to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let set = FileDescriptorSet {
            file: vec![
                file("test/probe.proto", "test.v1", "Probe"),
                file("other/other.proto", "other.v1", "Other"),
            ],
        };
        set.encode_to_vec().leak()
    }

    /// Counts the requests it sees.
    #[derive(Clone, Default)]
    struct CountingLayer(Arc<AtomicUsize>);

    impl<S> Layer<S> for CountingLayer {
        type Service = Counting<S>;
        fn layer(&self, inner: S) -> Counting<S> {
            Counting(inner, Arc::clone(&self.0))
        }
    }

    #[derive(Clone)]
    struct Counting<S>(S, Arc<AtomicUsize>);

    impl<S: Service<http::Request<Body>>> Service<http::Request<Body>> for Counting<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, request: http::Request<Body>) -> S::Future {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.call(request)
        }
    }

    fn probe_server() -> DaemonServer {
        DaemonServer::new()
            .describe(descriptor_set())
            .add_service(Probe)
    }

    async fn tcp_listener() -> Listener {
        Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    async fn check(endpoint: &str, service: &str) -> Status {
        HealthClient::new(connect_lazy(endpoint).unwrap())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    async fn reflect(
        endpoint: &str,
        request: MessageRequest,
    ) -> Result<MessageResponse, tonic::Status> {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut responses = ServerReflectionClient::new(connect_lazy(endpoint).unwrap())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        Ok(responses.next().await.unwrap()?.message_response.unwrap())
    }

    #[tokio::test]
    async fn every_listener_serves_the_same_services() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listeners = Listeners::bind_all(
            &[
                ListenAddress::Unix(socket.clone()),
                "127.0.0.1:0".parse().unwrap(),
            ],
            Exposure::LoopbackOnly,
        )
        .await
        .unwrap();
        let endpoints: Vec<String> = listeners.addresses().iter().map(|a| a.endpoint()).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(probe_server().serve(listeners, async {
            let _ = stopped.await;
        }));
        for endpoint in &endpoints {
            for service in ["", "test.v1.Probe"] {
                assert_eq!(
                    check(endpoint, service).await,
                    Status::Serving,
                    "{endpoint} {service:?}"
                );
            }
        }
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(
            !socket.exists(),
            "the socket file is removed when serving stops"
        );
    }

    #[tokio::test]
    async fn reflection_lists_and_describes_only_what_is_served() {
        let listener = tcp_listener().await;
        let endpoint = listener.endpoint();
        let server = probe_server();
        let expected = server.served_service_names();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        assert_eq!(
            expected,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "test.v1.Probe",
            ]
        );
        let MessageResponse::ListServicesResponse(list) =
            reflect(&endpoint, MessageRequest::ListServices(String::new()))
                .await
                .unwrap()
        else {
            panic!("expected a service list");
        };
        let mut listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        listed.sort();
        assert_eq!(listed, expected);

        let described = |response: Result<MessageResponse, tonic::Status>| match response {
            Ok(MessageResponse::FileDescriptorResponse(_)) => true,
            Err(status) if status.code() == tonic::Code::NotFound => false,
            other => panic!("unexpected {other:?}"),
        };
        let mut found = Vec::new();
        for symbol in [
            "test.v1.Probe",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "other.v1.Other",
        ] {
            let response = reflect(
                &endpoint,
                MessageRequest::FileContainingSymbol(symbol.to_owned()),
            )
            .await;
            found.push((symbol, described(response)));
        }
        assert_eq!(
            found,
            [
                ("test.v1.Probe", true),
                ("grpc.health.v1.Health", true),
                ("grpc.reflection.v1alpha.ServerReflection", true),
                ("other.v1.Other", false),
            ]
        );
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn v1alpha_reflection_lists_the_same_services() {
        use tonic_reflection::pb::v1alpha as alpha;
        let listener = tcp_listener().await;
        let endpoint = listener.endpoint();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(probe_server().serve(listener, async {
            let _ = stopped.await;
        }));
        let request = alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut responses = alpha::server_reflection_client::ServerReflectionClient::new(
            connect_lazy(&endpoint).unwrap(),
        )
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
        let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        let mut listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        listed.sort();
        assert_eq!(listed, probe_server().served_service_names());
        drop(responses);
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_service_without_a_descriptor_is_refused() {
        let error = DaemonServer::new()
            .add_service(Probe)
            .serve(tcp_listener().await, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "no registered file descriptor describes service test.v1.Probe; register its \
             descriptor set with DaemonServer::describe"
        );
    }

    #[tokio::test]
    async fn no_listener_is_an_error() {
        let error = probe_server()
            .serve(Listeners::default(), std::future::pending())
            .await
            .unwrap_err();
        assert!(matches!(error, ServeError::NoListeners), "{error}");
    }

    #[tokio::test]
    async fn health_turns_not_serving_at_shutdown_before_the_drain() {
        let listener = tcp_listener().await;
        let endpoint = listener.endpoint();
        let hook_ran = Arc::new(AtomicUsize::new(0));
        let hook_count = Arc::clone(&hook_ran);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            probe_server()
                .on_shutdown(move || {
                    hook_count.fetch_add(1, Ordering::SeqCst);
                })
                .serve(listener, async {
                    let _ = stopped.await;
                }),
        );
        let mut watches = Vec::new();
        for service in ["", "test.v1.Probe"] {
            let mut stream = HealthClient::new(connect_lazy(&endpoint).unwrap())
                .watch(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            let first: HealthCheckResponse = stream.message().await.unwrap().unwrap();
            assert_eq!(first.status(), Status::Serving, "{service:?}");
            watches.push(stream);
        }
        stop.send(()).unwrap();
        for stream in &mut watches {
            let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(next.status(), Status::NotServing);
        }
        assert_eq!(hook_ran.load(Ordering::SeqCst), 1);
        // The watches hold the drain open until they go.
        drop(watches);
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_layer_sees_every_request() {
        let listener = tcp_listener().await;
        let endpoint = listener.endpoint();
        let counter = CountingLayer::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            probe_server()
                .layer(counter.clone())
                .serve(listener, async {
                    let _ = stopped.await;
                }),
        );
        check(&endpoint, "").await;
        check(&endpoint, "test.v1.Probe").await;
        reflect(&endpoint, MessageRequest::ListServices(String::new()))
            .await
            .unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 3);
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_first_layer_added_is_the_outermost() {
        /// Records its name when it sees a request.
        #[derive(Clone)]
        struct Named(&'static str, Arc<std::sync::Mutex<Vec<&'static str>>>);
        impl<S> Layer<S> for Named {
            type Service = NamedSvc<S>;
            fn layer(&self, inner: S) -> NamedSvc<S> {
                NamedSvc(inner, self.clone())
            }
        }
        #[derive(Clone)]
        struct NamedSvc<S>(S, Named);
        impl<S: Service<http::Request<Body>>> Service<http::Request<Body>> for NamedSvc<S> {
            type Response = S::Response;
            type Error = S::Error;
            type Future = S::Future;
            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
                self.0.poll_ready(cx)
            }
            fn call(&mut self, request: http::Request<Body>) -> S::Future {
                self.1.1.lock().unwrap().push(self.1.0);
                self.0.call(request)
            }
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tcp_listener().await;
        let endpoint = listener.endpoint();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            probe_server()
                .layer(Named("outer", Arc::clone(&seen)))
                .layer(Named("inner", Arc::clone(&seen)))
                .serve(listener, async {
                    let _ = stopped.await;
                }),
        );
        check(&endpoint, "").await;
        assert_eq!(*seen.lock().unwrap(), ["outer", "inner"]);
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    }
}
