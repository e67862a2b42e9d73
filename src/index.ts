// Public API of elasticmoe.
export * from './runtime/index.js';
