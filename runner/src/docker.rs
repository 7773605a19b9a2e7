//! The docker executor: runs a job in a fresh container through the Docker
//! API. The bundle and the variables file are uploaded into the container (no
//! host bind mounts, so a runner that itself runs in a container works), the
//! output is attached before start so no byte is missed, and the container is
//! removed whatever happens.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use muster_common::bundle::Bundle;
use muster_common::plan::JobPlan;
use tokio_util::sync::CancellationToken;

use crate::session::{LogSink, Stream};

/// Where the workspace is in the container, as in Polycrate.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
const CONTAINER_VARS: &str = "/muster/vars.json";
/// Flush output at least this often, or when this much has gathered.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_BYTES: usize = 32 * 1024;
const STOP_GRACE_SECS: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("image {image} is not on this host and could not be pulled: {reason}")]
    ImageUnavailable { image: String, reason: String },
    #[error("preparing the job: {0}")]
    Prepare(String),
}

pub struct Outcome {
    pub exit_code: i64,
    pub canceled: bool,
}

pub struct Prepared {
    pub image: String,
    pub image_digest: String,
}

#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
    default_image: String,
}

impl DockerExecutor {
    /// Connects to the local daemon and agrees on an API version with it.
    pub async fn connect(default_image: String) -> Result<Self, ExecError> {
        let docker = Docker::connect_with_local_defaults()?
            .negotiate_version()
            .await?;
        docker.ping().await?;
        Ok(DockerExecutor {
            docker,
            default_image,
        })
    }

    pub fn image_for(&self, plan: &JobPlan) -> String {
        plan.image
            .clone()
            .unwrap_or_else(|| self.default_image.clone())
    }

    /// Makes sure the image is present (pulling it if not) and names its digest.
    pub async fn prepare(&self, image: &str) -> Result<Prepared, ExecError> {
        let inspect = match self.docker.inspect_image(image).await {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                let options = CreateImageOptionsBuilder::new().from_image(image).build();
                let mut pull = self.docker.create_image(Some(options), None, None);
                while let Some(step) = pull.next().await {
                    step.map_err(|e| ExecError::ImageUnavailable {
                        image: image.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
                self.docker.inspect_image(image).await?
            }
            Err(e) => return Err(e.into()),
        };
        let digest = inspect
            .repo_digests
            .and_then(|d| d.into_iter().next())
            .and_then(|d| d.split_once('@').map(|(_, digest)| digest.to_owned()))
            .or(inspect.id)
            .unwrap_or_default();
        Ok(Prepared {
            image: image.to_owned(),
            image_digest: digest,
        })
    }

    /// Runs the job to its end, streaming output into `sink`.
    pub async fn run(
        &self,
        run_id: &str,
        image: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Outcome, ExecError> {
        let mut env: Vec<String> = plan
            .environment(CONTAINER_WORKSPACE)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("IN_CONTAINER=true".into());
        env.push(format!("MUSTER_RUN_ID={run_id}"));
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(plan.argv(CONTAINER_WORKSPACE, CONTAINER_VARS)),
            working_dir: Some(plan.working_dir(CONTAINER_WORKSPACE)),
            env: Some(env),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            labels: Some(
                [("io.muster.run-id".to_owned(), run_id.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            host_config: Some(HostConfig {
                init: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("muster-run-{run_id}");
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await?;
        let id = created.id;
        let result = self.run_created(&id, plan, bundle, sink, cancel).await;
        let remove = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        if let Err(error) = self.docker.remove_container(&id, Some(remove)).await {
            tracing::warn!(run_id, container = %id, %error, "could not remove the job's container");
        }
        result
    }

    async fn run_created(
        &self,
        id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Outcome, ExecError> {
        let mut workspace_tar = Vec::new();
        bundle
            .write_tar_with_prefix(
                CONTAINER_WORKSPACE.trim_start_matches('/'),
                &mut workspace_tar,
            )
            .map_err(|e| ExecError::Prepare(e.to_string()))?;
        let vars = serde_json::to_vec_pretty(&plan.vars_for(CONTAINER_WORKSPACE))
            .map_err(|e| ExecError::Prepare(e.to_string()))?;
        let vars_tar = single_file_tar(CONTAINER_VARS.trim_start_matches('/'), &vars)
            .map_err(|e| ExecError::Prepare(e.to_string()))?;
        for tar in [workspace_tar, vars_tar] {
            let options = UploadToContainerOptionsBuilder::new().path("/").build();
            self.docker
                .upload_to_container(id, Some(options), bollard::body_full(Bytes::from(tar)))
                .await?;
        }

        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .logs(true)
            .build();
        let mut output = self.docker.attach_container(id, Some(attach)).await?.output;
        self.docker.start_container(id, None).await?;

        let mut canceled = false;
        let mut pending: Option<(Stream, Vec<u8>)> = None;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled(), if !canceled => {
                    canceled = true;
                    let stop = StopContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
                    if let Err(error) = self.docker.stop_container(id, Some(stop)).await {
                        tracing::warn!(container = %id, %error, "stopping the canceled job's container failed");
                    }
                    continue;
                }
                next = tokio::time::timeout(FLUSH_EVERY, output.next()) => next,
            };
            match next {
                Err(_elapsed) => {
                    if let Some((stream, data)) = pending.take() {
                        sink.write(stream, data).await;
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    tracing::warn!(container = %id, %error, "reading the job's output failed");
                    break;
                }
                Ok(Some(Ok(item))) => {
                    let (stream, bytes) = match item {
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            (Stream::Stdout, message)
                        }
                        LogOutput::StdErr { message } => (Stream::Stderr, message),
                        LogOutput::StdIn { .. } => continue,
                    };
                    match &mut pending {
                        Some((s, data)) if *s == stream => data.extend_from_slice(&bytes),
                        _ => {
                            if let Some((s, data)) = pending.take() {
                                sink.write(s, data).await;
                            }
                            pending = Some((stream, bytes.to_vec()));
                        }
                    }
                    if pending
                        .as_ref()
                        .is_some_and(|(_, d)| d.len() >= FLUSH_BYTES)
                    {
                        if let Some((s, data)) = pending.take() {
                            sink.write(s, data).await;
                        }
                    }
                }
            }
        }
        if let Some((stream, data)) = pending.take() {
            sink.write(stream, data).await;
        }

        let exit_code = match self.docker.wait_container(id, None).next().await {
            Some(Ok(response)) => response.status_code,
            // bollard reports a non-zero exit as an error that carries the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(e.into()),
            None => {
                let inspect = self.docker.inspect_container(id, None).await?;
                inspect.state.and_then(|s| s.exit_code).unwrap_or(-1)
            }
        };
        Ok(Outcome {
            exit_code,
            canceled,
        })
    }
}

fn single_file_tar(path: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    if let Some((dir, _)) = path.rsplit_once('/') {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        builder.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    builder.append_data(&mut header, path, data)?;
    builder.into_inner()
}
