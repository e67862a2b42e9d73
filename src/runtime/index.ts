export * from './errors.js';
export * from './config.js';
export { loadBinding, injectBinding, possibleSolutions, packageRoot } from './loader.js';
export { Chunk, VirtualRange, DevicePointer, HostBuffer, type SharedHandle } from './memory.js';
export { Stream, Event, type LaunchDims, type Dim3 } from './stream.js';
export { Module, Kernel, arg, type KernelArg, type ModuleSpec, type ModuleFormat } from './kernel.js';
export { Runtime, selectBackend, type BackendSelection, type DeviceInfo } from './runtime.js';
export { UnixChannel, UnixListener, type ChannelMessage } from './channel.js';
export type { BackendName, NativeStatus, NativeProbe } from './native-types.js';
