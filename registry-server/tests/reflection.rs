//! Server reflection under `grpc.reflection.v1` and `grpc.reflection.v1alpha`,
//! checked with a client of each version, so that tools that speak only one
//! of the two versions find the schema.

mod common;

use std::time::Duration;

use common::{sqlite_url, ServerProcess};
use prost::Message;
use prost_types::FileDescriptorProto;

/// Time one reflection exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Decodes one FileDescriptorProto from a reflection response.
fn decode_file(bytes: &[u8]) -> FileDescriptorProto {
    FileDescriptorProto::decode(bytes).expect("reflection returned a valid FileDescriptorProto")
}

/// Checks the descriptor of the registry API file.
fn assert_registry_file(file: &FileDescriptorProto) {
    assert_eq!(file.name(), "registry/v1/registry.proto");
    assert_eq!(file.package(), "registry.v1");
    for dependency in [
        "google/protobuf/duration.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    ] {
        assert!(
            file.dependency.iter().any(|name| name == dependency),
            "{dependency} missing from {:?}",
            file.dependency
        );
    }
    let messages: Vec<&str> = file.message_type.iter().map(|message| message.name()).collect();
    assert!(messages.contains(&"Worker"), "{messages:?}");

    let service = file
        .service
        .iter()
        .find(|service| service.name() == "WorkerRegistry")
        .expect("WorkerRegistry service in registry.proto");
    let mut methods: Vec<&str> = service.method.iter().map(|method| method.name()).collect();
    methods.sort_unstable();
    assert_eq!(methods, ["Deregister", "Get", "Heartbeat", "List", "Register"]);
    let heartbeat = service
        .method
        .iter()
        .find(|method| method.name() == "Heartbeat")
        .unwrap();
    assert!(heartbeat.client_streaming(), "Heartbeat must stream requests");
    assert!(heartbeat.server_streaming(), "Heartbeat must stream responses");
}

/// Generates one test that runs the same exchange against the reflection
/// service of one protocol version. A macro is used because the generated
/// types of both versions have the same shape but are distinct types.
macro_rules! reflection_test {
    ($(#[$doc:meta])* $name:ident, $version:ident) => {
        $(#[$doc])*
        #[tokio::test]
        async fn $name() {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;

            let dir = tempfile::tempdir().unwrap();
            let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
            let mut client = ServerReflectionClient::new(server.channel().await);

            // One stream carries four requests, and the server handles them in order.
            let requests = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol("registry.v1.Worker".into()),
                MessageRequest::FileByFilename("google/protobuf/struct.proto".into()),
                MessageRequest::FileContainingSymbol("registry.v1.NoSuchMessage".into()),
            ]
            .map(|request| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            });
            // tonic-reflection 0.14 ends the stream with a NOT_FOUND status for
            // an unknown symbol instead of sending an ErrorResponse message.
            let exchange = async {
                let mut stream = client
                    .server_reflection_info(tokio_stream::iter(requests))
                    .await
                    .expect("reflection call failed")
                    .into_inner();
                let mut responses = Vec::new();
                let end = loop {
                    match stream.message().await {
                        Ok(Some(response)) => {
                            responses.push(response.message_response.expect("response carries a message"))
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status),
                    }
                };
                (responses, end)
            };
            let (responses, end) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
                .await
                .expect("reflection exchange timed out");
            assert_eq!(responses.len(), 3, "one response per known name: {responses:?}");

            let MessageResponse::ListServicesResponse(listed) = &responses[0] else {
                panic!("list_services returned {:?}", responses[0]);
            };
            let services: Vec<&str> = listed.service.iter().map(|service| service.name.as_str()).collect();
            assert!(services.contains(&"registry.v1.WorkerRegistry"), "{services:?}");
            assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");

            let MessageResponse::FileDescriptorResponse(containing) = &responses[1] else {
                panic!("file_containing_symbol returned {:?}", responses[1]);
            };
            assert!(!containing.file_descriptor_proto.is_empty(), "no file for registry.v1.Worker");
            assert_registry_file(&decode_file(&containing.file_descriptor_proto[0]));

            // Clients fetch each dependency by file name next.
            let MessageResponse::FileDescriptorResponse(dependency) = &responses[2] else {
                panic!("file_by_filename returned {:?}", responses[2]);
            };
            assert!(!dependency.file_descriptor_proto.is_empty(), "no file for struct.proto");
            let structure = decode_file(&dependency.file_descriptor_proto[0]);
            assert_eq!(structure.name(), "google/protobuf/struct.proto");
            let messages: Vec<&str> = structure.message_type.iter().map(|message| message.name()).collect();
            assert!(messages.contains(&"Struct"), "{messages:?}");

            let end = end.expect("stream ended without an error for the unknown symbol");
            assert_eq!(end.code(), tonic::Code::NotFound, "{end:?}");
            assert!(end.message().contains("registry.v1.NoSuchMessage"), "{end:?}");
        }
    };
}

reflection_test!(
    /// Reflection v1 lists the services and returns the registry descriptors.
    reflection_v1_describes_registry,
    v1
);

reflection_test!(
    /// Reflection v1alpha lists the services and returns the registry descriptors.
    reflection_v1alpha_describes_registry,
    v1alpha
);
