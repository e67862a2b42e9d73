// The serving layer: the HTTP server, what it needs from a deployment, and the
// in-process stack it serves today.
export { ApiError, type ErrorBody } from './errors.js';
export {
  EngineDeployment, type EngineDeploymentParts, type KvPoolState, type LayoutInfo, type ScalableLike, type ScaleResult, type ServedModel,
  type ServingDeployment, localDeployment, placementTable, scalableDeployment,
} from './deployment.js';
export { type LocalStack, type LocalStackOptions, type ModelFiles, type ModelFilesOptions, kvBlocksFromMemory, loadModelFiles, startLocalStack } from './local.js';
export { ServeMetrics } from './metrics.js';
export { type GenerationPlan, type PlanLimits, planChat, planCompletion } from './openai.js';
export { type ServerHandle, type ServerOptions, createServer } from './server.js';
export * from './autoscale.js';
